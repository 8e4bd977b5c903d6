"""Evaluation wired into runs (issue 6): every task of the eval group on the embedded model offline, protocols
labelled in the record, the quantized base's results cached across runs, re-evaluation of a completed run from its
saved adapter, and the compose-time checks."""

from __future__ import annotations

import json

import pytest
from conftest import FAST

from qpeft_bench import recipe
from qpeft_bench.config import ConfigError
from qpeft_bench.evaluation import PROTOCOLS
from qpeft_bench.spec import validate

TINY_ALL = ["eval=tiny_all", *FAST]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("qpeft_cache")


@pytest.fixture(scope="module")
def trained(compose, tmp_path_factory, cache_dir):
    """One run with every task (the fixtures of eval=tiny_all), and its record."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QPEFT_CACHE", str(cache_dir))
    run_dir = tmp_path_factory.mktemp("run")
    assert recipe.run(compose(TINY_ALL), run_dir, progress=False) == "completed"
    mp.undo()
    return run_dir, json.loads((run_dir / "result.json").read_text())


def test_every_task_runs_and_is_labelled(trained):
    _, rec = trained
    ev = rec["eval"]
    tasks = ["ppl_heldout", "ppl_wikitext", "mmlu", "commonsense"]
    assert set(ev["before"]) == set(tasks) and set(ev["after"]) == {*tasks, "speed"}  # speed: after only
    assert ev["protocols"] == {t: PROTOCOLS[t] for t in (*tasks, "speed")}
    assert ev["after"]["ppl_wikitext"]["protocol"] == PROTOCOLS["ppl_wikitext"]  # labelled at the source too
    mmlu = ev["after"]["mmlu"]
    assert mmlu["engine"] == "lm-eval" and mmlu["lm_eval_version"] and mmlu["batch_size"] == 8
    entry = mmlu["tasks"]["mmlu"]
    assert (entry["num_fewshot"], entry["split"], entry["fewshot_split"]) == (5, "test", "dev")
    assert len(entry["subtasks"]) == 57 and 0 <= mmlu["average"] <= 1
    assert len(ev["after"]["commonsense"]["tasks"]) == 7
    speed = ev["after"]["speed"]
    assert speed["generation"]["new_tokens"] == 16 and speed["generation"]["tokens_per_s"] > 0
    assert speed["step"]["forward_ms"] > 0 and speed["step"]["backward_ms"] > 0
    assert set(ev["time_s"]["after"]) == {*tasks, "speed"}
    assert ev["before_cached"] == []  # the first run computes its base results


def test_the_base_results_are_cached_for_the_next_run_of_the_same_base(
    compose, trained, cache_dir, tmp_path, monkeypatch
):
    _, first = trained
    monkeypatch.setenv("QPEFT_CACHE", str(cache_dir))
    # another method on the same quantized base: the "before" row is not recomputed
    assert (
        recipe.run(
            compose([*TINY_ALL, "peft.r=4", "eval.tasks=[ppl_heldout,ppl_wikitext,mmlu]"]), tmp_path, progress=False
        )
        == "completed"
    )
    rec = json.loads((tmp_path / "result.json").read_text())
    assert rec["eval"]["before_cached"] == ["mmlu", "ppl_heldout", "ppl_wikitext"]
    assert rec["eval"]["before"] == {k: first["eval"]["before"][k] for k in ("ppl_heldout", "ppl_wikitext", "mmlu")}
    assert "ppl_heldout" not in rec["eval"]["time_s"]["before"]
    # another quantizer is another base: computed
    other = tmp_path / "fp4"
    assert (
        recipe.run(compose([*TINY_ALL, "quant=fp4", "eval.tasks=[ppl_heldout]"]), other, progress=False) == "completed"
    )
    assert json.loads((other / "result.json").read_text())["eval"]["before_cached"] == []


def test_a_completed_run_is_re_evaluated_from_its_adapter_without_losing_anything(
    compose, trained, tmp_path, monkeypatch
):
    import shutil

    src, first = trained
    run_dir = tmp_path / "copy"
    shutil.copytree(src, run_dir)
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    config = compose(
        [
            "mode=eval",
            f"run_dir={run_dir}",
            "eval=tiny_all",
            "eval.tasks=[ppl_heldout,ppl_wikitext]",
            "eval.before_finetune=false",
        ]
    )
    assert recipe.run(config, tmp_path / "hydra_dir", progress=False) == "completed"
    rec = json.loads((run_dir / "result.json").read_text())
    # the same adapter on the same base: the same numbers as right after training
    assert rec["eval"]["after"]["ppl_heldout"] == pytest.approx(first["eval"]["after"]["ppl_heldout"], rel=1e-6)
    assert rec["eval"]["after"]["ppl_wikitext"]["ppl"] == pytest.approx(
        first["eval"]["after"]["ppl_wikitext"]["ppl"], rel=1e-6
    )
    # nothing else lost: training, accounting, the other tasks, the config
    for key in ("train", "accounting", "quant", "config", "run_id", "status", "adapter"):
        assert rec[key] == first[key], key
    assert rec["eval"]["after"]["mmlu"] == first["eval"]["after"]["mmlu"]
    assert rec["eval"]["reevaluations"][0]["tasks"] == ["ppl_heldout", "ppl_wikitext"]


def test_a_re_evaluation_waits_for_no_one_and_writes_nothing_while_the_run_is_in_use(
    compose, trained, tmp_path, caplog
):
    """Two re-evaluations of one run at once (or one during a re-run of its training): the second is refused with a
    clear error before it reads the record, so neither loses the other's results."""
    import shutil

    from qpeft_bench import results

    src, _ = trained
    run_dir = tmp_path / "copy"
    shutil.copytree(src, run_dir)
    before = (run_dir / "result.json").read_bytes()
    other = results.RunLock(run_dir)
    assert other.acquire() is None  # another process' lock: flock refuses a second open file in this one too
    try:
        config = compose(["mode=eval", f"run_dir={run_dir}", "eval.tasks=[ppl_heldout]"])
        assert recipe.run(config, tmp_path / "hydra_dir", progress=False) == "failed"
    finally:
        other.release()
    assert "is in use by another process" in caplog.text
    assert (run_dir / "result.json").read_bytes() == before


def test_re_evaluation_keeps_the_trained_runs_fp32_norms(compose, tmp_path):
    """train=qlora evaluates after training with its norms in fp32 (train.upcast_norms_fp32); a re-evaluation from
    the saved adapter must do the same, or its perplexity moves (by 1.3% on a 7B shape)."""
    overrides = [
        "train.max_steps=3",
        "data.max_examples=80",
        "eval.max_batches=2",
        "train.upcast_norms_fp32=true",
        "train.device=cpu",
    ]
    assert recipe.run(compose(overrides), tmp_path / "run", progress=False) == "completed"
    first = json.loads((tmp_path / "run" / "result.json").read_text())
    config = compose(["mode=eval", f"run_dir={tmp_path / 'run'}", "eval.max_batches=2", "eval.before_finetune=false"])
    assert recipe.run(config, tmp_path / "hydra_dir", progress=False) == "completed"
    again = json.loads((tmp_path / "run" / "result.json").read_text())
    assert again["eval"]["after"]["ppl_heldout"] == pytest.approx(first["eval"]["after"]["ppl_heldout"], rel=1e-6)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "holds no readable result.json"),
        ("no_adapter", "no saved adapter"),
    ],
)
def test_re_evaluation_refuses_what_it_cannot_do(compose, trained, tmp_path, caplog, setup, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if setup == "no_adapter":
        rec = dict(trained[1])
        rec.pop("adapter")
        (run_dir / "result.json").write_text(json.dumps(rec))
    before = sorted(p.name for p in run_dir.iterdir())
    assert recipe.run(compose(["mode=eval", f"run_dir={run_dir}"]), tmp_path / "h", progress=False) == "failed"
    assert message in caplog.text
    assert sorted(p.name for p in run_dir.iterdir()) == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.tasks=[ppl_heldout,hellaswag]"], "unknown task 'hellaswag'"),
        (["eval=ppl_wikitext", "eval.wikitext.seq_len=4096"], "eval.wikitext.seq_len=4096 exceeds the context length"),
        (["eval=speed", "eval.speed.new_tokens=512"], "does not fit the context length"),
        (["eval=mmlu", "eval.data_root=/nonexistent"], "eval.data_root='/nonexistent' is not a directory"),
        (
            ["eval=ppl_wikitext", "eval.wikitext.path=/nonexistent.jsonl"],
            "eval.wikitext.path='/nonexistent.jsonl' does not",
        ),
        (["+eval.harness.shots=3"], "unknown key eval.harness.shots"),
    ],
)
def test_bad_eval_settings_fail_before_any_model_is_loaded(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def test_missing_benchmark_files_are_named_at_compose_time(compose, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate(compose(["eval=commonsense", f"eval.data_root={tmp_path}"]))
    assert "Rowan/hellaswag" in str(err.value) and "QPEFT_EVAL_DATA" in str(err.value)


def test_wikitext_window_defaults_to_the_model_context_up_to_2048(compose):
    assert validate(compose(["eval=ppl_wikitext"])).eval.wikitext.seq_len == 512  # the tiny model's context
    assert validate(compose(["eval=ppl_wikitext", "model=llama2_7b", "mode=plan"])).eval.wikitext.seq_len == 2048


def test_a_run_whose_evaluation_failed_after_training_keeps_its_adapter_and_is_finished_by_mode_eval(
    compose, tmp_path, monkeypatch
):
    """Issue 19: an evaluation that fails after training (a benchmark file gone, a crash in a task) must not lose
    the training: the adapter is kept and `mode=eval` finishes the run."""
    from qpeft_bench import eval_stage

    real = eval_stage.run_eval

    def failing_after(*args, **kwargs):
        if args[8] == "after":  # (spec, tokenizer, val_set, device, dtype, progress, record, model, stage, cache)
            raise FileNotFoundError("ppl_wikitext: /data/wiki.test.raw does not exist")
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "run_eval", failing_after)
    overrides = ["train.max_steps=3", "data.max_examples=80", "eval.max_batches=2", "train.device=cpu"]
    assert recipe.run(compose(overrides), tmp_path / "run", progress=False) == "failed"
    failed = json.loads((tmp_path / "run" / "result.json").read_text())
    assert failed["adapter"] and (tmp_path / "run" / "adapter").is_dir() and "after" not in failed["eval"]
    monkeypatch.setattr(recipe, "run_eval", real)

    config = compose(["mode=eval", f"run_dir={tmp_path / 'run'}", "eval.max_batches=2", "eval.before_finetune=false"])
    assert recipe.run(config, tmp_path / "hydra_dir", progress=False) == "completed"
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["status"] == "completed" and "error" not in rec
    assert rec["train"] == failed["train"] and rec["eval"]["after"]["ppl_heldout"] > 0
    assert "wiki.test.raw" in rec["eval"]["reevaluations"][0]["finished_failed_run"]["message"]
