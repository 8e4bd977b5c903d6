"""W&B logging (issue 7): off by default, offline mode mirrors the finished record under the run directory with the
run id as the W&B run's name and id, and a W&B failure never fails a run."""

from __future__ import annotations

import json

from conftest import FAST

from qpeft_bench import recipe, results


def test_logger_settings_are_not_part_of_the_run_id(compose):
    assert results.run_id(compose(FAST)) == results.run_id(compose([*FAST, "logger=wandb", "wandb.project=x"]))


def test_offline_wandb_mirrors_the_record(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = compose([*FAST, "logger=wandb", "train.save_adapter=false"])
    assert recipe.run(config, tmp_path, progress=False) == "completed"
    rec = json.loads((tmp_path / "result.json").read_text())
    assert rec["status"] == "completed" and rec["wandb_dir"]
    (run,) = (tmp_path / "wandb").glob(f"offline-run-*-{rec['run_id']}")
    assert run.is_dir() and list(run.glob("*.wandb"))  # W&B's offline log, to `wandb sync` later
    assert rec["wandb_dir"] == str(run)


def test_a_wandb_failure_is_a_warning_and_the_run_completes(compose, tmp_path, monkeypatch, caplog):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken)
    config = compose([*FAST, "logger=wandb", "train.save_adapter=false"])
    assert recipe.run(config, tmp_path, progress=False) == "completed"
    rec = json.loads((tmp_path / "result.json").read_text())
    assert rec["status"] == "completed" and rec["wandb_dir"] is None
    assert "W&B logging failed (RuntimeError: no network)" in caplog.text
