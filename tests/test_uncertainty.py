"""The report's intervals and paired comparisons on run records that keep per-item results (eval_items.json.gz, see
docs/run-record.md): which cells get them, the significance table, and what happens without, or with bad, items."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from test_report import lora, sweep_record, write

from qpeft_bench.evaluation.items import write_items
from qpeft_bench.report.cli import main

N_EXAMPLES = 300
SUBJECTS = ("mmlu_anatomy", "mmlu_astronomy")


def items_file(run_dir: Path, run_id: str, stages: dict) -> dict:
    """The per-item file as a run writes it (evaluation/items.py)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_items(run_dir, run_id, stages)


def heldout(rng: np.random.Generator, scale: float) -> dict:
    tokens = rng.integers(20, 60, size=N_EXAMPLES)
    return {
        "kind": "nll",
        "unit": "example",
        "ids": list(range(N_EXAMPLES)),
        "nll": (tokens * scale * rng.uniform(0.9, 1.1, size=N_EXAMPLES)).tolist(),
        "tokens": tokens.tolist(),
    }


def mmlu(correct: dict[str, list[float]]) -> dict:
    return {
        "kind": "scores",
        "leaves": {s: {"doc_ids": list(range(len(v))), "scores": v} for s, v in correct.items()},
        "entries": {"mmlu": list(SUBJECTS)},
        "averages": {"average": ["mmlu"]},
    }


def run(root: Path, run_id: str, seed: int, variant: list[str], ppl_items: dict, mmlu_items: dict | None = None):
    """A completed run whose record numbers are what its items give."""
    ppl = math.exp(sum(ppl_items["nll"]) / sum(ppl_items["tokens"]))
    after: dict = {"ppl_heldout": ppl}
    stages = {"after": {"ppl_heldout": ppl_items}}
    if mmlu_items is not None:
        leaves = mmlu_items["leaves"]
        after["mmlu"] = {"average": sum(np.mean(leaves[s]["scores"]) for s in SUBJECTS) / len(SUBJECTS)}
        stages["after"]["mmlu"] = mmlu_items
    record = sweep_record(run_id, "completed", peft=lora(8, 16, variant=variant), seed=seed, after=after)
    record["eval"]["items"] = items_file(root / run_id, run_id, stages)
    write(root / run_id / "result.json", json.dumps(record))
    return record


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """uniform, 'attn.r/2' (the same numbers as uniform, seed by seed) and 'mlp.r/2' (5% more NLL on every
    example), two seeds each, on the same 300 held-out examples and the same MMLU items."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        base = heldout(np.random.default_rng(seed), 1.5)
        worse = {**base, "nll": [v * 1.05 for v in base["nll"]]}
        answers = np.random.default_rng(10 + seed).random((2, 100)) < 0.5
        correct = {s: answers[i].astype(float).tolist() for i, s in enumerate(SUBJECTS)}
        run(root, f"u{seed}", seed, [], base, mmlu(correct))
        run(root, f"a{seed}", seed, ["attn.r/2"], base, mmlu(correct))
        run(root, f"m{seed}", seed, ["mlp.r/2"], worse, mmlu(correct))
    return root


def report(root: Path, out: Path, *args: str) -> int:
    return main([str(root), "--out", str(out), "--bootstrap", "400", *args])


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_layer_groups_get_intervals_and_a_significance_mark_only_where_the_difference_is_real(runs, tmp_path, capsys):
    assert report(runs, tmp_path / "t") == 0
    text = (tmp_path / "t" / "by_layer_group.md").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("| tiny_llama")]
    uniform, attn, mlp = (cell.strip() for cell in line.split("|")[6:9])
    assert "[" in uniform and "Δ" not in uniform  # the baseline has an interval, and no comparison with itself
    assert "Δ +0.000 [+0.000, +0.000]" in attn and not attn.endswith("‡")
    assert "Δ +" in mlp and mlp.endswith("‡")
    assert "percentile bootstrap" in text and "Holm" in text
    (pivot,) = rows(tmp_path / "t" / "by_layer_group.csv")
    assert float(pivot["uniform_low"]) < float(pivot["uniform_mean"]) < float(pivot["uniform_high"])
    assert float(pivot["mlp.r/2_diff_low"]) > 0 and float(pivot["mlp.r/2_p_holm"]) < 0.05
    assert pivot["uniform_diff"] == ""

    tested = rows(tmp_path / "t" / "significance.csv")
    verdicts = {(t["table"], t["column"]): t["verdict"] for t in tested}
    assert verdicts[("by_layer_group", "ppl_after (mlp.r/2)")] == "yes"
    assert verdicts[("by_layer_group", "ppl_after (attn.r/2)")] == "no"
    # per_configuration compares each layer-group row with its uniform row, on perplexity and on MMLU
    per_config = [(t["row"].split()[-1], t["column"], t["verdict"]) for t in tested if t["table"].startswith("per_")]
    assert sorted(per_config) == [
        ("attn.r/2", "mmlu_after", "no"),
        ("attn.r/2", "ppl_after", "no"),
        ("mlp.r/2", "mmlu_after", "no"),
        ("mlp.r/2", "ppl_after", "yes"),
    ]
    assert "## Paired comparisons against the baselines" in capsys.readouterr().out


def test_the_report_with_intervals_is_byte_identical_when_made_again(runs, tmp_path):
    assert report(runs, tmp_path / "a") == 0 and report(runs, tmp_path / "b") == 0
    for path in sorted((tmp_path / "a").iterdir()):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name


def test_a_named_baseline_compares_with_that_row(runs, tmp_path):
    # against mlp.r/2 instead: uniform and attn.r/2 are now the better ones
    assert report(runs, tmp_path / "t", "--baseline", "layer_group=mlp.r/2", "--table", "significance") == 0
    tested = rows(tmp_path / "t" / "significance.csv")
    pivot = [t for t in tested if t["table"] == "by_layer_group"]
    assert {t["column"] for t in pivot} == {"ppl_after (uniform)", "ppl_after (attn.r/2)"}
    assert all(float(t["diff"]) < 0 and t["verdict"] == "yes" for t in pivot)


def test_bootstrap_zero_and_bad_baselines(runs, tmp_path, capsys):
    assert report(runs, tmp_path / "t", "--bootstrap", "0") == 0
    text = (tmp_path / "t" / "by_layer_group.md").read_text()
    assert "Δ" not in text and "--bootstrap 0" in text
    assert not (tmp_path / "t" / "significance.md").exists()
    for bad in ("method", "=lora", "r=", "method=lora,,r=8", "foo=bar", "r=8,r=16"):
        with pytest.raises(SystemExit) as exc:
            report(runs, tmp_path / "u", "--baseline", bad)
        assert exc.value.code == 2
        assert "--baseline" in capsys.readouterr().err
    for bad in ("-1", "1", "99", "1000000000"):
        with pytest.raises(SystemExit):
            report(runs, tmp_path / "u", "--bootstrap", bad)
        assert "--bootstrap must be 0 (off) or 100 .. 100000" in capsys.readouterr().err


def test_cells_without_usable_items_get_no_interval_and_the_notes_say_why(runs, tmp_path):
    # m1: the items file is gone; a1: its record's number is not what its items give (a stale file)
    (runs / "m1" / "eval_items.json.gz").unlink()
    stale = json.loads((runs / "a1" / "result.json").read_text())
    stale["eval"]["after"]["ppl_heldout"] *= 1 + 1e-7  # off by more than float rounding
    (runs / "a1" / "result.json").write_text(json.dumps(stale))
    assert report(runs, tmp_path / "t") == 0
    text = (tmp_path / "t" / "by_layer_group.md").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("| tiny_llama")]
    uniform, attn, mlp = (cell.strip() for cell in line.split("|")[6:9])
    assert "[" in uniform and "[" not in attn and "[" not in mlp
    assert "per-item results of run m1 not used" in text and "eval_items.json.gz" in text
    assert "per-item results of run a1 not used: per-item results of ppl_heldout do not give the record's" in text
    assert "2 quality cells have no interval" in text


def test_a_limited_evaluation_is_compared_but_never_tested(runs, tmp_path):
    for run_id in ("m0", "m1"):
        record = json.loads((runs / run_id / "result.json").read_text())
        record["eval"]["coverage"] = {
            "after": {"ppl_heldout": {"kind": "limited", "why": "eval.max_batches=2 of 9 batches"}}
        }
        (runs / run_id / "result.json").write_text(json.dumps(record))
    assert report(runs, tmp_path / "t") == 0
    text = (tmp_path / "t" / "by_layer_group.md").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("| tiny_llama")]
    mlp = line.split("|")[8].strip()
    assert "Δ +" in mlp and "‡" not in mlp and mlp.endswith("†")
    assert "involve a limited or fixtures evaluation" in text
    tested = {(t["table"], t["column"]): t for t in rows(tmp_path / "t" / "significance.csv")}
    limited = tested[("by_layer_group", "ppl_after (mlp.r/2)")]
    assert limited["verdict"].startswith("not tested") and limited["p_holm"] == ""


def test_the_per_run_tables_give_each_runs_own_interval(runs, tmp_path):
    assert report(runs, tmp_path / "t") == 0
    text = (tmp_path / "t" / "evaluation.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| m0"))
    assert re.search(r"\d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\]", line), line
    assert "interval of the run's value" in text
    (m0,) = [r for r in rows(tmp_path / "t" / "evaluation.csv") if r["run_id"] == "m0"]
    assert float(m0["ppl_after_low"]) < float(m0["ppl_after"]) < float(m0["ppl_after_high"])
    assert "ppl_before_low" not in m0  # these records keep no items of the base: no interval, not a made-up one
