"""Tests for qpeft_bench.report.figures: the figures' data (always) and the images (when matplotlib is installed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_report import sweep_records, write

from qpeft_bench.report import figures
from qpeft_bench.report.cli import main
from qpeft_bench.report.records import load_records


@pytest.fixture
def loaded(tmp_path: Path):
    for run_id, record in sweep_records().items():
        write(tmp_path / "runs" / run_id / "result.json", json.dumps(record))
    return load_records(tmp_path / "runs")


def test_layer_group_data_follows_the_pivot(loaded) -> None:
    rows = figures.layer_group_data(loaded, 1000.0)
    bars = {(r["group"], r["setting"]): (r["mean"], r["n"]) for r in rows}
    # lora r8 on alpaca: seeds 6.0 and 6.4 uniform, 6.6 with mlp.r/2 (test_report.sweep_records)
    assert bars[("tiny_llama alpaca nf4 +dq lora 8", "uniform")] == (pytest.approx(6.2), 2)
    assert bars[("tiny_llama alpaca nf4 +dq lora 8", "mlp.r/2")] == (6.6, 1)
    assert not any(group.startswith("tiny_llama alpaca nf4 +dq rslora* 8") for group, _ in bars)  # only diverged


def test_pareto_data_leaves_out_diverged_and_unfinished_runs(loaded) -> None:
    ids = [r["run_id"] for r in figures.pareto_data(loaded, 1000.0)]
    assert sorted(ids) == sorted(["l8s0", "l8s1", "l16", "l8oa", "l8mlp", "rs16"])


def test_loss_data_has_every_step(loaded) -> None:
    rows = figures.loss_data(loaded)
    per_run = {r["run_id"] for r in rows}
    assert "ia3" not in per_run and "dora" not in per_run  # no train section
    assert [r["loss"] for r in rows if r["run_id"] == "l16"] == sweep_records()["l16"]["train"]["losses"]
    assert figures.data_csv(rows).splitlines()[0] == "run_id,step,loss"


def test_figures_are_written_non_empty_and_byte_identical(loaded, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    first = figures.write_figures(loaded, tmp_path / "a")
    second = figures.write_figures(loaded, tmp_path / "b")
    names = sorted(p.name for p in first)
    assert names == sorted(
        f"{n}.{ext}" for n in ("by_layer_group", "pareto", "loss_curves") for ext in ("csv", "png", "pdf")
    )
    for a, b in zip(sorted(first), sorted(second), strict=True):
        assert a.stat().st_size > 0 and a.read_bytes() == b.read_bytes(), a.name
    with (tmp_path / "a" / "pareto.csv").open(newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 6


def test_report_figures_flag_writes_beside_the_tables(tmp_path: Path, loaded, capsys) -> None:
    code = main([str(tmp_path / "runs"), "--out", str(tmp_path / "results" / "tables"), "--figures"])
    err = capsys.readouterr().err
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 1 and "needs matplotlib" in err
        return
    assert code == 0
    assert (tmp_path / "results" / "figures" / "pareto.png").stat().st_size > 0
