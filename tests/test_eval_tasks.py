"""The evaluation task registry (qpeft_bench/evaluation/tasks.py): every task is one definition, and the config
check, the dispatch of evaluate(), the protocol labels, the base cache, the summaries and the report read it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qpeft_bench import evaluation
from qpeft_bench.config import ConfigError, EvalConfig, from_dict
from qpeft_bench.evaluation import harness
from qpeft_bench.evaluation.checks import check_eval
from qpeft_bench.evaluation.tasks import TASKS, EvalTask
from qpeft_bench.report import rows

ROOT = Path(__file__).resolve().parent.parent


def _eval(**section) -> EvalConfig:
    return from_dict(EvalConfig, {"name": "t", **section}, "eval")


def test_every_registered_task_has_a_protocol_a_runner_and_a_headline():
    assert list(TASKS) == ["ppl_heldout", "ppl_wikitext", "mmlu", "commonsense", "leaderboard", "speed"]
    for name, task in TASKS.items():
        assert task.name == name and task.protocol and callable(task.run)
        if task.summary is not None:  # a summary row needs a number: a bare float or the metric's key
            assert name == "ppl_heldout" or task.metric is not None
        if task.lm_eval is not None:
            entries = [s.task for s in task.lm_eval.tasks]
            assert task.metric == "average" and set(task.lm_eval.dirs) == set(entries)
            assert all(set(members) <= set(entries) for members in task.lm_eval.averages.values())
            assert task.check is not None  # its local data is checked at validation
    assert evaluation.PROTOCOLS == {n: t.protocol for n, t in TASKS.items()}
    assert evaluation.AFTER_ONLY == ("speed",)
    assert [t for t, _, _ in evaluation.SUMMARIES] == [
        "ppl_heldout",
        "ppl_wikitext",
        "mmlu",
        "commonsense",
        "leaderboard",
    ]
    assert set(harness.TASK_SETS) == {"mmlu", "commonsense", "leaderboard"}


def test_headlines_read_each_tasks_metric():
    assert evaluation.headline(9.5, "ppl_heldout") == 9.5
    assert evaluation.headline({"ppl": 12.0, "windows": 3}, "ppl_wikitext") == 12.0
    assert evaluation.headline({"average": 0.4, "average_4": 0.5}, "leaderboard") == 0.4
    assert evaluation.headline({"generation": {}}, "speed") is None
    assert evaluation.headline(None, "mmlu") is None


def test_the_config_check_names_the_available_tasks():
    with pytest.raises(ConfigError) as err:
        check_eval(_eval(tasks=["ppl_heldout", "hellaswag"]), 512, "tiny")
    assert str(err.value) == (
        "eval.tasks: unknown task 'hellaswag'; available: ppl_heldout, ppl_wikitext, mmlu, commonsense, leaderboard, "
        "speed"
    )


def test_a_tasks_local_data_is_checked_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="Rowan/hellaswag"):
        check_eval(_eval(tasks=["commonsense"], data_root=str(tmp_path)), 512, "tiny")
    check_eval(_eval(tasks=["mmlu"], data_root=str(harness.FIXTURES)), 512, "tiny")  # all there: passes


def test_a_new_task_is_one_definition(monkeypatch):
    """A registered definition is checked, dispatched, labelled and kept out of the base run by its own fields."""
    calls = []
    task = EvalTask(
        "toy",
        "the model's name length",
        run=lambda model, ctx: {"score": len(model), "stage": ctx.stage, "batch": ctx.config.batch_size},
        metric="score",
        before=False,
        check=lambda ev, context, name: calls.append((context, name)),
    )
    monkeypatch.setitem(TASKS, "toy", task)
    ev = _eval(tasks=["toy"], batch_size=3)
    check_eval(ev, 512, "tiny")
    assert calls == [(512, "tiny")]
    common = dict(device="cpu", compute_dtype=None, progress=False, heldout_batches=list)
    assert evaluation.evaluate("abcd", None, ev, stage="before", **common) == ({}, {})
    out, seconds = evaluation.evaluate("abcd", None, ev, stage="after", **common)
    assert out == {"toy": {"score": 4, "stage": "after", "batch": 3}} and set(seconds) == {"toy"}
    assert evaluation.headline(out["toy"], "toy") == 4


def test_the_base_cache_settings_are_unchanged():
    """The cache key's settings per task, as the record of every cached base was written with them."""
    ev = _eval(data_root="/data")
    harness_settings = {**dataclasses.asdict(ev.harness), "data_root": "/data"}
    assert evaluation.cache_settings(ev) == {
        "ppl_heldout": {"max_batches": None},
        "ppl_wikitext": {**dataclasses.asdict(ev.wikitext), "data_root": "/data"},
        "mmlu": harness_settings,
        "commonsense": harness_settings,
        "leaderboard": harness_settings,
    }


def test_the_report_reads_the_registry_and_it_loads_without_torch():
    assert rows.COMMONSENSE_TASKS == tuple(s.task for s in TASKS["commonsense"].lm_eval.tasks)
    assert set(rows.LEADERBOARD_TASKS) == {s.task for s in TASKS["leaderboard"].lm_eval.tasks}
    code = "import sys, qpeft_bench.evaluation.tasks, qpeft_bench.report.catalog; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
