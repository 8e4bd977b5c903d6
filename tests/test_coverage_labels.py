"""Issue 19, item 6: limited evaluations looked like full ones. With eval.harness.limit=3 the console and the report
said "unweighted mean of the 57 subjects"; max_windows, max_batches and the shipped fixtures were invisible; lm-eval
logged one "Truncating ... from the left" warning per context while the record said nothing. Now every result
records its coverage (evaluation/coverage.py), the console and the report mark what is not the full benchmark and
say why, and truncated contexts are counted per task and said once."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from conftest import FAST

from qpeft_bench import ASSETS, evaluation, models, recipe
from qpeft_bench.config import EvalConfig, from_dict
from qpeft_bench.evaluation import coverage, harness, truncation
from qpeft_bench.evaluation.tasks import TASKS, EvalTask
from qpeft_bench.report.aggregate import build_aggregate
from qpeft_bench.report.catalog import AGGREGATES, EVALUATION
from qpeft_bench.report.records import LoadResult, RunRecord
from qpeft_bench.report.render import render_csv, render_latex, render_markdown
from qpeft_bench.report.tables import build_table
from qpeft_bench.summary import summary_line, summary_table

FIXTURES = "shipped fixtures (qpeft_bench/assets/eval_fixtures)"
WIKI_FIXTURE = "shipped fixtures (qpeft_bench/assets/data/fixtures/wikitext_test.jsonl)"


@pytest.fixture(scope="module")
def limited_run(compose, tmp_path_factory):
    """The fixtures of eval=tiny_all, limited further, after fine-tuning only (the quick part of tiny_all)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QPEFT_CACHE", str(tmp_path_factory.mktemp("cache")))
    run_dir = tmp_path_factory.mktemp("run")
    overrides = [
        "eval=tiny_all",
        *FAST,
        "train.max_steps=2",
        "eval.tasks=[ppl_heldout,ppl_wikitext,commonsense]",
        "eval.before_finetune=false",
        "eval.harness.limit=1",
        "eval.wikitext.max_windows=1",
    ]
    assert recipe.run(compose(overrides), run_dir, progress=False, summary=False) == "completed"
    mp.undo()
    return run_dir / "result.json", json.loads((run_dir / "result.json").read_text())


def test_a_limited_run_records_what_each_result_covers(limited_run):
    _, rec = limited_run
    after = rec["eval"]["coverage"]["after"]
    assert after["ppl_heldout"]["kind"] == "limited" and set(after["ppl_heldout"]) == {"kind", "why"}
    available = re.fullmatch(r"eval.max_batches=2 of (\d+) batches", after["ppl_heldout"]["why"])
    assert available and int(available[1]) > 2  # the cap cut the split: said with how much there was
    assert after["ppl_wikitext"]["kind"] == "fixtures"
    assert after["ppl_wikitext"]["why"].startswith(f"{WIKI_FIXTURE}; eval.wikitext.max_windows=1 of ")
    assert after["commonsense"] == {
        "kind": "fixtures",
        "why": f"{FIXTURES}; eval.harness.limit=1 items per task",
        "truncated": 0,
    }
    assert "speed" not in after  # it measures time, not a benchmark
    # the bare number stays a number where every reader looks for it
    assert isinstance(rec["eval"]["after"]["ppl_heldout"], float)
    entry = rec["eval"]["after"]["commonsense"]["tasks"]["piqa"]
    assert entry["samples"] == 1 < entry["samples_total"] and entry["truncated"] == 0


def test_the_console_marks_what_is_not_the_full_benchmark(limited_run):
    path, rec = limited_run
    line = summary_line(rec, path)
    assert "*" not in line.split("ppl_heldout")[0]  # nothing marked before the task fields
    heldout = line.split("ppl_heldout ")[1].split(" | ")[0]
    assert heldout.startswith("- -> ") and heldout.endswith("*") and heldout.count("*") == 1
    why = rec["eval"]["coverage"]["after"]["ppl_heldout"]["why"]
    assert f"* not the full benchmark: ppl_heldout: {why}; ppl_wikitext: " in line
    assert f"commonsense: {FIXTURES}; eval.harness.limit=1 items per task" in line
    table = summary_table(rec, path)
    assert "* not the full benchmark" in table and "eval.harness.limit=1 items per task" in table
    assert table.count("*") >= 4  # three marked values and the row that says why


def test_truncated_contexts_are_counted_per_task_and_said_once(caplog):
    """A context longer than the model's length: lm-eval cuts it from the left and warned once per request; now
    the items are counted per task, recorded, and said in one line per task."""
    path = str(ASSETS / "tiny_llama")
    model, tokenizer = models.load_model(path, "float32", "cpu").eval(), models.load_tokenizer(path)
    model.config.max_position_embeddings = 40  # lm-eval takes the model's length from its config
    caplog.set_level(logging.INFO)
    out = harness.run_task_set(
        model,
        tokenizer,
        "commonsense",
        batch_size=16,
        data_root=harness.FIXTURES,
        limit=2,
        device="cpu",
        progress=True,  # lm-eval's own warnings are let through with progress on: they must not be there
    )
    cut = {task: e["truncated"] for task, e in out["tasks"].items()}
    assert sum(cut.values()) > 0 and all(0 <= cut[t] <= out["tasks"][t]["samples"] for t in cut)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if m.startswith(truncation.WARNINGS)]
    said = [m for m in messages if "contexts truncated to the model's 40 tokens (from the left)" in m]
    assert sorted(said) == sorted(
        f"{t}: {n} of 2 contexts truncated to the model's 40 tokens (from the left)" for t, n in cut.items() if n
    )


_CONFIG = {"model": {"name": "tiny_llama"}, "quant": {"name": "nf4"}, "peft": {"method": "lora"}}


def _record(run_id: str, seed: int, mmlu: float, limit: int | None) -> dict:
    """A synthetic completed record with an MMLU result, limited to `limit` items per task or full."""
    rec = {
        "schema": "qpeft-bench/run-record/v1",
        "run_id": run_id,
        "status": "completed",
        "config": {
            "seed": seed,
            "model": {"name": "tiny_llama"},
            "quant": {"name": "nf4"},
            "peft": {"method": "lora", "name": "lora", "r": 8, "alpha": 16},
            "data": {"name": "alpaca"},
        },
        "eval": {"before": {"ppl_heldout": 12.0}, "after": {"ppl_heldout": 9.0, "mmlu": {"average": mmlu}}},
    }
    if limit is not None:
        why = f"eval.harness.limit={limit} items per task"
        rec["eval"]["coverage"] = {"after": {"mmlu": {"kind": "limited", "why": why, "truncated": 0}}}
    return rec


def _loaded(*records: dict) -> LoadResult:
    return LoadResult(records=[RunRecord(Path(f"/runs/{r['run_id']}/result.json"), r) for r in records])


def test_the_report_marks_limited_cells_and_says_why(limited_run):
    path, rec = limited_run
    full = _record("full1", 0, 0.5, None)
    table = build_table(EVALUATION, LoadResult(records=[RunRecord(path, rec), *_loaded(full).records]))
    md = render_markdown(table)
    ours = next(line for line in md.splitlines() if line.startswith(f"| {rec['run_id']}"))
    assert ours.count("†") == 3  # held-out ppl, WikiText ppl and commonsense after; nothing before
    theirs = next(line for line in md.splitlines() if line.startswith("| full1"))
    assert "†" not in theirs
    note = next(n for n in table.notes if n.startswith("†"))
    why = rec["eval"]["coverage"]["after"]["ppl_heldout"]["why"]
    assert f"{why} (held-out ppl after of {rec['run_id']})" in note
    assert f"{FIXTURES}; eval.harness.limit=1 items per task (commonsense after of {rec['run_id']})" in note
    assert "$^\\dagger$" in render_latex(table)
    csv_rows = render_csv(table).splitlines()
    assert csv_rows[0].endswith(",not_full") and why in csv_rows[1]


def test_an_aggregated_cell_is_marked_when_any_of_its_runs_is_limited():
    """The issue's case: eval.harness.limit=3, and the MMLU table said 'unweighted mean of the 57 subjects'."""
    runs = _loaded(_record("seed0", 0, 0.25, 3), _record("seed1", 1, 0.27, None))
    md = render_markdown(build_aggregate(AGGREGATES["mmlu"], runs))
    assert "0.2600 ± 0.0141 (2)†" in md
    assert (
        "- † not the full benchmark, not comparable with published numbers: eval.harness.limit=3 items per task "
        "(MMLU after (dataset alpaca) of seed0)" in md
    )
    full = render_markdown(build_aggregate(AGGREGATES["mmlu"], _loaded(_record("seed1", 1, 0.27, None))))
    assert "†" not in full  # a table without such cells is as before
    per_seed = render_markdown(build_aggregate(AGGREGATES["per_configuration"], runs))
    assert "(2)†" in per_seed and "MMLU after of seed0" in per_seed


def test_a_full_record_and_an_old_one_are_unmarked():
    full = _record("full1", 0, 0.5, None)
    full["eval"]["coverage"] = {"after": {"mmlu": {"kind": "full", "truncated": 12}, "ppl_heldout": {"kind": "full"}}}
    old = _record("old1", 0, 0.5, None)  # no eval.coverage at all: records written before it existed
    table = build_table(EVALUATION, _loaded(full, old))
    assert "†" not in render_markdown(table) and not any(n.startswith("†") for n in table.notes)
    for rec in (full, old):
        line = summary_line(rec, Path("result.json"))
        assert "*" not in line and "| mmlu - -> 0.5 |" in line
    assert "truncated (items)" in summary_table({**full, "config": _CONFIG}, Path("result.json"))
    assert coverage.not_full(coverage.of(full, "after", "mmlu")) is None


def test_a_cached_base_result_keeps_its_coverage(monkeypatch, tmp_path):
    """The base's results are cached across a sweep: a limited one must still read as limited when reused."""
    limited = coverage.entry(["eval.max_batches=2 batches"])
    task = EvalTask("toy", "a constant", run=lambda model, ctx: coverage.Covered(1.5, limited))
    monkeypatch.setitem(TASKS, "toy", task)
    ev = from_dict(EvalConfig, {"name": "t", "tasks": ["toy"]}, "eval")
    cache = evaluation.BaseEvalCache({"base": "x"}, {}, root=tmp_path)
    common = dict(stage="before", device="cpu", compute_dtype=None, progress=False, heldout_batches=list, cache=cache)
    for _ in range(2):  # computed, then from the cache
        covs = {}
        assert evaluation.evaluate(None, None, ev, coverages=covs, **common)[0] == {"toy": 1.5}
        assert covs == {"toy": {"kind": "limited", "why": "eval.max_batches=2 batches"}}
    assert cache.coverage("toy") == limited
