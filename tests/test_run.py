"""End to end on the embedded tiny model: runs, records, skip/resume, failures, the CLI, the report."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from conftest import CLI, FAST, ROOT

from qpeft_bench import plan, quant, recipe, results
from qpeft_bench.spec import validate

ACCOUNTING_KEYS = {
    "total_params",
    "trainable_params",
    "trainable_pct",
    "base_model_bytes",
    "quantized_model_bytes",
    "param_buffer_bytes",
    "adapter_bytes",
    "peft_overhead_bytes",
    "bits_per_weight",
}


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_short_default_run_writes_a_complete_record(compose, tmp_path):
    config = compose(FAST)
    assert recipe.run(config, tmp_path, progress=False) == "completed"
    rec = json.loads((tmp_path / "result.json").read_text())
    assert rec["schema"] == results.SCHEMA and rec["status"] == "completed"
    assert rec["run_id"] == results.run_id(config)
    assert ACCOUNTING_KEYS <= set(rec["accounting"])
    acc, tr = rec["accounting"], rec["train"]
    assert acc["trainable_params"] == acc["adapter_bytes"] // 2  # bf16 adapters
    assert len(tr["losses"]) == 4 and tr["measured_steps"] == 3 and tr["s_per_step"] > 0
    assert tr["peak_memory_bytes"] > acc["quantized_model_bytes"]
    assert rec["eval"]["before"]["ppl_heldout"] > 1 and rec["eval"]["after"]["ppl_heldout"] > 1
    meta = rec["meta"]
    assert meta["packages"]["torch"] and meta["packages"]["bitsandbytes"] and meta["end_time"]
    assert meta["git_commit"] is None or len(meta["git_commit"]) == 40


@pytest.mark.parametrize("qname", quant.names())
def test_short_run_on_each_quantizer(compose, tmp_path, qname):
    config = compose([*FAST, f"quant={qname}", "calib.samples=8", "calib.seq_len=128"])
    assert recipe.run(config, tmp_path, progress=False) == "completed"
    rec = json.loads((tmp_path / "result.json").read_text())
    acc, q = rec["accounting"], rec["quant"]
    assert rec["config"]["quant"]["name"] == q["name"] == qname
    planned = plan.plan_accounting(validate({**config, "mode": "plan"}))
    assert acc["bits_per_weight"] == pytest.approx(planned["bits_per_weight"], rel=1e-9)
    assert acc["quantized_model_bytes"] == planned["quantized_model_bytes"]
    # every layer's error was measured on the probe; a real quantizer loses something, none only bf16 rounding
    assert len(q["layers"]) == 28 and q["quantize_time_s"] >= 0
    assert q["calibration"] == {"source": "finetune", "windows": 8, "seq_len": 128, "tokens": 1024}
    assert (q["weight_rel_error"] == 0) == (qname == "none")
    assert 0 < q["output_rel_error"] < (0.01 if qname == "none" else 0.5)
    assert math.isfinite(rec["eval"]["after"]["ppl_heldout"])


def test_qlora_setup_switches_train_and_are_recorded(compose, tmp_path):
    # fp32 norms next to bf16 weights only work under autocast: this failed on CUDA before autocast was added.
    overrides = [*FAST, "train.upcast_norms_fp32=true", "train.gradient_checkpointing=true"]
    assert recipe.run(compose(overrides), tmp_path, progress=False) == "completed"
    tr = json.loads((tmp_path / "result.json").read_text())["train"]
    assert tr["upcast_norms_fp32"] is True and tr["gradient_checkpointing"] is True
    assert all(math.isfinite(x) for x in tr["losses"])


def test_completed_runs_are_skipped_and_overwrite_redoes_them(compose, tmp_path, caplog):
    caplog.set_level("INFO", logger="qpeft_bench")
    config = compose(FAST)
    assert recipe.run(config, tmp_path, progress=False) == "completed"
    first = (tmp_path / "result.json").read_text()
    assert recipe.run(config, tmp_path, progress=False) == "skipped"
    assert (tmp_path / "result.json").read_text() == first
    assert "already completed" in caplog.text
    assert recipe.run(compose([*FAST, "overwrite=true"]), tmp_path, progress=False) == "completed"


def test_every_finished_run_logs_one_summary_line(compose, tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO", logger="qpeft_bench")
    assert recipe.run(compose(FAST), tmp_path / "ok", progress=False, summary=False) == "completed"
    rec = json.loads((tmp_path / "ok" / "result.json").read_text())
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("completed ")]
    assert line.startswith(f"completed {rec['run_id']} in ") and "\n" not in line
    before, after = rec["eval"]["before"]["ppl_heldout"], rec["eval"]["after"]["ppl_heldout"]
    assert f"ppl_heldout {before:.4g} -> {after:.4g}" in line
    assert f"loss {rec['train']['losses'][0]:.4g} -> {rec['train']['final_loss']:.4g}" in line
    assert line.endswith(str(tmp_path / "ok" / "result.json"))

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in training")

    monkeypatch.setattr(recipe, "train", boom)
    caplog.clear()
    assert recipe.run(compose(FAST), tmp_path / "bad", progress=False, summary=False) == "failed"
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("failed ")]
    assert "RuntimeError: simulated crash in training" in line


def test_a_different_config_never_overwrites_a_completed_record(compose, tmp_path):
    assert recipe.run(compose(FAST), tmp_path, progress=False) == "completed"
    before = (tmp_path / "result.json").read_text()
    assert recipe.run(compose([*FAST, "peft.r=4"]), tmp_path, progress=False) == "failed"
    assert (tmp_path / "result.json").read_text() == before


def test_a_crash_mid_run_leaves_a_failed_record(compose, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in training")

    monkeypatch.setattr(recipe, "train", boom)
    assert recipe.run(compose(FAST), tmp_path, progress=False) == "failed"
    rec = json.loads((tmp_path / "result.json").read_text())
    assert rec["status"] == "failed" and "simulated crash" in rec["error"]["message"]
    assert rec["accounting"]["quantized_model_bytes"] > 0  # what was measured before the crash is kept
    assert "ppl_heldout" in rec["eval"]["before"]


def test_divergence_is_recorded_with_its_step(compose, tmp_path):
    assert recipe.run(compose([*FAST, "train.diverge_loss=0.001"]), tmp_path, progress=False) == "diverged"
    rec = json.loads((tmp_path / "result.json").read_text())
    assert rec["status"] == "diverged" and rec["train"]["diverged_at_step"] == 0


def test_bad_config_writes_no_record(compose, tmp_path):
    assert recipe.run(compose(["+peft.rank=4"]), tmp_path, progress=False) == "failed"
    assert not (tmp_path / "result.json").exists()


def test_plan_mode_cli_honours_run_dir(tmp_path):
    run_dir = tmp_path / "plan7b"
    proc = cli(
        "mode=plan",
        "model=llama2_7b",
        "quant=nf4",
        "peft=lora",
        "peft.r=64",
        "peft.alpha=16",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    rec = json.loads((run_dir / "result.json").read_text())
    assert rec["status"] == "planned"
    assert ACCOUNTING_KEYS <= set(rec["accounting"])
    assert rec["accounting"]["trainable_params"] == 159_907_840
    assert "159,907,840" in proc.stdout + proc.stderr  # the summary table


def test_help_lists_groups_and_options(tmp_path):
    out = cli("--help", cwd=tmp_path).stdout
    groups = out.split("== Config groups")[1].split("== Composed config")[0]
    # options that only the group list shows (the composed config holds the defaults only)
    for text in (
        "model:",
        "quant:",
        "peft:",
        "data:",
        "train:",
        "eval:",
        "sweep:",
        "experiment:",
        "fp4",
        "opt_1_3b",
        "llama2_70b",
        "hh_rlhf",
        "qlora",
        "smoke",
    ):
        assert text in groups, text


def test_unknown_key_is_a_clear_error_with_nonzero_exit(tmp_path):
    proc = cli("peft.rank=4", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "peft.rank" in proc.stderr
    proc = cli("+peft.rank=4", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "unknown key peft.rank" in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("result.json"))


def test_plan_grid_writes_one_record_per_point_and_fails_loudly_on_a_bad_one(tmp_path):
    cli("-m", "mode=plan", "model=llama2_7b", "peft.r=4,8", "peft.alpha=8,16", cwd=tmp_path)
    records = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/result.json")]
    assert len({r["run_id"] for r in records}) == 4 and {r["status"] for r in records} == {"planned"}
    assert {(r["config"]["peft"]["r"], r["config"]["peft"]["alpha"]) for r in records} == {
        (4, 8),
        (4, 16),
        (8, 8),
        (8, 16),
    }
    (tmp_path / "bad").mkdir()
    proc = cli("-m", "mode=plan", "model=llama2_7b", "peft.r=8,0", cwd=tmp_path / "bad", check=False)
    assert proc.returncode == 1
    assert "peft.r=0 must be > 0" in proc.stdout + proc.stderr
    assert "2 runs planned" in proc.stdout and "1 grid point(s) FAILED to plan" in proc.stdout
    assert len(list((tmp_path / "bad").glob("runs/*/result.json"))) == 1


def test_grid_runs_once_and_resumes(tmp_path):
    """`-m` over a 2x2 grid: four records; a re-run skips all; a failed one is redone, the rest skipped."""
    grid = ["-m", "peft.r=4,8", "peft.alpha=8,16", *FAST, "output_root=runs"]
    cli(*grid, cwd=tmp_path)
    records = sorted(tmp_path.glob("runs/*/result.json"))
    assert len(records) == 4
    assert {json.loads(p.read_text())["status"] for p in records} == {"completed"}
    assert len({json.loads(p.read_text())["run_id"] for p in records}) == 4

    victim = json.loads(records[0].read_text())
    victim["status"] = "running"  # as a run killed mid-way leaves it
    records[0].write_text(json.dumps(victim))
    proc = cli(*grid, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert log.count("already completed") == 3
    assert "sweep finished: 4 runs: 1 completed, 3 skipped" in log
    assert json.loads(records[0].read_text())["status"] == "completed"

    report = subprocess.run(
        [str(Path(CLI[0]).parent / "qpeft-bench-report"), "runs", "--out", "tables", "--table", "overview"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert report.stdout.count("| completed |") == 4


@pytest.mark.slow
def test_make_run_default_config_improves_heldout_perplexity(tmp_path):
    """The default run, exactly as `make run` starts it: fine-tuning must lower held-out perplexity."""
    cli("output_root=runs", cwd=tmp_path)
    (record,) = tmp_path.glob("runs/*/result.json")
    rec = json.loads(record.read_text())
    assert rec["status"] == "completed"
    assert rec["eval"]["after"]["ppl_heldout"] < 0.8 * rec["eval"]["before"]["ppl_heldout"]


def test_repository_root_has_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_report_on_real_completed_failed_and_planned_runs(compose, tmp_path, monkeypatch):
    from qpeft_bench import report

    runs = tmp_path / "runs"
    assert recipe.run(compose(FAST), runs / "a", progress=False) == "completed"
    assert (
        recipe.run(compose(["mode=plan", "model=llama2_7b", "peft.r=64", "peft.alpha=16"]), runs / "b", progress=False)
        == "planned"
    )
    monkeypatch.setattr(recipe, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    assert recipe.run(compose([*FAST, "peft.r=4"]), runs / "c", progress=False) == "failed"

    assert report.main([str(runs), "--out", str(tmp_path / "tables")]) == 0
    import csv

    rows = {r["status"]: r for r in csv.DictReader(open(tmp_path / "tables" / "overview.csv"))}
    assert set(rows) == {"completed", "planned", "failed"}
    assert rows["planned"]["trainable_params"] == "159907840"
    assert rows["planned"]["model"] == "llama2_7b"
    completed = json.loads((runs / "a" / "result.json").read_text())
    assert float(rows["completed"]["ppl_after"]) == pytest.approx(completed["eval"]["after"]["ppl_heldout"])
    assert rows["failed"]["r"] == "4"
