"""Tests for qpeft_bench.report.figures (the figures' data, labels and footnotes: always) and figure_draw (the images,
when matplotlib is installed): what each figure encodes, intervals and comparisons present and absent, marked
values, and that no text is cut off in what is saved, also with long names and many layer groups."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from test_report import lora, lora_accounting, sweep_record, sweep_records, trained, write

from qpeft_bench.report import figure_draw, figures
from qpeft_bench.report.cli import main
from qpeft_bench.report.records import load_records
from qpeft_bench.report.stats import Comparison, Interval
from qpeft_bench.report.tables import Agg

LIMITED = "eval.max_batches=2 batches"
HOW = "windows within runs, runs across seeds"


def load(tmp_path: Path, records: dict[str, dict[str, Any]], name: str = "runs"):
    for run_id, record in records.items():
        write(tmp_path / name / run_id / "result.json", json.dumps(record))
    return load_records(tmp_path / name)


@pytest.fixture
def loaded(tmp_path: Path):
    return load(tmp_path, sweep_records())


def limited(record: dict[str, Any]) -> dict[str, Any]:
    """The record as if its held-out perplexity came from a capped evaluation (rows.MARKS)."""
    record["eval"]["coverage"] = {"after": {"ppl_heldout": {"kind": "limited", "why": LIMITED}}}
    return record


def long_records() -> dict[str, dict[str, Any]]:
    """A sweep with long names: a long method and quantizer name, three data sets, seven layer-group settings (one
    with a long edit list) for two methods, two seeds, and a loss curve per run (33 curves)."""
    out = {}
    variants = [
        [],
        ["mlp.r/2"],
        ["attn.r/2"],
        ["first_half.r*2", "second_half.r/2"],
        ["mlp.alpha*4", "attn.alpha/4", "an_unusually_long_variant_edit_name"],
        ["attn.r*2"],
        ["mlp.r*2"],
    ]
    long_method = "a_really_long_method_name_that_goes_on_and_on"
    for i, variant in enumerate(variants):
        for seed, name in ((0, "lora"), (1, "lora"), (0, long_method)):
            ppl = 6.0 + 0.1 * i + 0.05 * seed + 0.3 * (name != "lora")
            run_id = f"v{i}s{seed}" + ("long" if name != "lora" else "")
            out[run_id] = sweep_record(
                run_id,
                "completed",
                peft=lora(8, 16, name, variant=variant),
                seed=seed,
                accounting=lora_accounting(8),
                train={**trained(2.0 + 0.01 * i, 100.0), "losses": [3.0, 2.0 - 0.01 * i, 1.5 + 0.02 * seed]},
                after={"ppl_heldout": ppl},
            )
    quants = [{"name": "nf4", "double_quant": True}, {"name": "hqq_with_a_long_quantizer_name", "nbits": 2}]
    methods = [("lora", {}), (long_method, {}), ("rslora", {"use_rslora": True})]
    for q, quant in enumerate(quants):
        for m, (method, extra) in enumerate(methods):
            for data in ("oasst1", "unnatural_instructions_core_with_a_long_name"):
                run_id = f"q{q}m{m}{data[:3]}"
                out[run_id] = sweep_record(
                    run_id,
                    "completed",
                    peft=lora(16, 32, method, **extra),
                    data=data,
                    quant=quant,
                    accounting={**lora_accounting(16), "bits_per_weight": 4.5 - 2 * q},
                    train=trained(3.0 - q + 0.1 * m, 120.0),
                    after={"ppl_heldout": 7.0 + q + 0.2 * m},
                )
    return out


def with_uncertainty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every aggregated cell the figures read gets an interval, and every by_layer_group column besides 'uniform' a
    comparison: 'mlp.r/2' significant after Holm, the others not (what stats.py will fill in)."""
    real = figures.build_aggregate

    def build(spec, loaded, diverged_ppl=1000.0, reference=None, settings=None):
        table = real(spec, loaded, diverged_ppl, reference, settings)
        for row in table.rows:
            for col in table.spec.columns:
                agg = row.get(col.key)
                if not isinstance(agg, Agg):
                    continue
                compared = spec.across is not None and col.key != "uniform"
                p_holm = 0.004 if col.key == "mlp.r/2" else 0.3
                row[col.key] = Agg(
                    agg.values,
                    interval=Interval(agg.mean - 0.1, agg.mean + 0.2, 0.95, HOW),
                    comparison=Comparison("uniform", 0.4, 0.1, 0.7, p_holm / 2, p_holm) if compared else None,
                )
        return table

    monkeypatch.setattr(figures, "build_aggregate", build)


# --------------------------------------------------------------------------------------------- data (no matplotlib)


def test_layer_group_data_follows_the_pivot(loaded) -> None:
    rows = figures.layer_group_data(loaded, 1000.0)
    bars = {(r["group"], r["setting"]): (r["mean"], r["n"]) for r in rows}
    # lora r8 on alpaca: seeds 6.0 and 6.4 uniform, 6.6 with mlp.r/2 (test_report.sweep_records)
    assert bars[("tiny_llama alpaca nf4 +dq lora 8", "uniform")] == (pytest.approx(6.2), 2)
    assert bars[("tiny_llama alpaca nf4 +dq lora 8", "mlp.r/2")] == (6.6, 1)
    # rslora r8 only diverged; lora r16 and lora r8 on oasst1 have no setting but uniform: nothing to compare
    assert {group for group, _ in bars} == {"tiny_llama alpaca nf4 +dq lora 8"}
    uniform = next(r for r in rows if r["setting"] == "uniform")
    assert uniform["bar"] == "± 1 sample std over seeds" and uniform["low"] == pytest.approx(6.2 - 0.4 / 2**0.5)
    assert all(r["significant"] is None and r["p_holm"] is None for r in rows)  # no comparisons yet


def test_no_layer_group_figure_without_layer_groups(tmp_path: Path) -> None:
    records = {k: v for k, v in sweep_records().items() if k != "l8mlp"}
    assert "by_layer_group" not in figures.plots(load(tmp_path, records))
    assert sorted(figures.plots(load(tmp_path, sweep_records(), "all"))) == ["by_layer_group", "loss_curves", "pareto"]


def test_pareto_is_per_configuration_with_quantizer_method_and_front(loaded) -> None:
    points = figures.pareto_data(loaded, 1000.0)
    got = {(p["data"], p["method"], p["r"], p["layer_group"]): (p["x"], p["y"], p["n"], p["front"]) for p in points}
    # the two lora r8 seeds are one point (mean 2.25 GiB, ppl 6.2, n=2); the diverged rslora r8 is not a point
    assert got == {
        ("alpaca", "lora", 8, "mlp.r/2"): (pytest.approx(1.9), 6.6, 1, True),
        ("alpaca", "lora", 8, "uniform"): (2.25, pytest.approx(6.2), 2, True),
        ("alpaca", "lora", 16, "uniform"): (3.0, 5.6, 1, False),  # rslora r16: as much memory, lower perplexity
        ("alpaca", "rslora", 16, "uniform"): (3.0, 5.5, 1, True),
        ("oasst1", "lora", 8, "uniform"): (2.0, 9.0, 1, True),  # its own panel, its own front
    }
    assert {p["quant"] for p in points} == {"nf4 +dq"} and {p["model"] for p in points} == {"tiny_llama"}
    header = figures.data_csv(points, leave_out=("key",)).splitlines()[0].split(",")
    for column in ("model", "data", "quant", "method", "r", "alpha", "layer_group", "x", "y", "low", "high", "n"):
        assert column in header
    assert "marked" in header and "bar" in header and "key" not in header
    plot = figures.plots(loaded)["pareto"]
    assert plot.x_label == "mean training memory (GiB)" and "Pareto front" in plot.notes[0]
    assert "none (a single run, no interval) (4 of 5); ± 1 sample std over seeds (1 of 5)" in plot.notes[1]


def test_pareto_x_can_be_bits_or_trainable_params(loaded) -> None:
    bits = {p["x"] for p in figures.pareto_data(loaded, 1000.0, "bits")}
    assert bits == {4.5}
    params = {p["r"]: p["x"] for p in figures.pareto_data(loaded, 1000.0, "params") if p["layer_group"] == "uniform"}
    assert params == {8: 8 * 2 * 640 * 4, 16: 16 * 2 * 640 * 4}
    plot = figures.plots(loaded, pareto_x="params")["pareto"]
    assert plot.x_log and plot.x_label.startswith("trainable parameters")


def test_loss_curves_are_labelled_by_what_varies(loaded) -> None:
    rows = figures.loss_data(loaded)
    labels = {r["run_id"]: r["label"] for r in rows}
    assert "ia3" not in labels and "dora" not in labels  # no train section
    assert labels["l8s0"] == "alpaca lora r=8 α=16 uniform seed 0"
    assert labels["l8s1"] == "alpaca lora r=8 α=16 uniform seed 1"
    assert labels["l8mlp"] == "alpaca lora r=8 α=16 mlp.r/2 seed 0"
    assert labels["rs8"] == "alpaca rslora r=8 α=16 uniform seed 0 (diverged)"  # use_rslora: the method says it
    assert not any(run_id in label for run_id, label in labels.items())
    assert [r["loss"] for r in rows if r["run_id"] == "l16"] == sweep_records()["l16"]["train"]["losses"]
    assert figures.data_csv(rows).splitlines()[0] == "run_id,label,step,loss"
    assert figures.plots(loaded)["loss_curves"].title == "Training loss per step: tiny_llama, nf4 +dq"


def test_loss_labels_name_a_varying_config_leaf_and_number_repeats(tmp_path: Path) -> None:
    records = {}
    for run_id, lr, steps in (("a", 1e-3, 60), ("b", 2e-4, 60), ("c", 2e-4, 60), ("d", 2e-4, 90)):
        record = sweep_record(run_id, "completed", peft=lora(8, 16), train=trained(2.0, 1.0), after={"ppl_heldout": 6})
        record["config"]["train"] = {"lr": lr, "max_steps": steps, "log_every": len(run_id)}
        records[run_id] = record
    labels = {r["run_id"]: r["label"] for r in figures.loss_data(load(tmp_path, records))}
    assert labels == {
        "a": "lr=0.001 max_steps=60",
        "b": "lr=0.0002 max_steps=60",
        "c": "lr=0.0002 max_steps=60 #2",
        "d": "lr=0.0002 max_steps=90",
    }
    one = figures.loss_data(load(tmp_path, {"a": records["a"]}, "one"))
    assert one[0]["label"] == "lora r=8 α=16"  # nothing varies: what the run is


def test_steps_without_a_finite_loss_are_left_out(tmp_path: Path) -> None:
    record = sweep_record("x", "diverged", peft=lora(8, 16), train={"losses": [2.0, float("inf"), float("nan")]})
    rows = figures.loss_data(load(tmp_path, {"x": record}))
    assert [(r["step"], r["loss"], r["label"]) for r in rows] == [(1, 2.0, "lora r=8 α=16 (diverged)")]


def test_a_layer_group_without_its_baseline_is_drawn_without_the_line(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    loaded = load(tmp_path, {"l8mlp": sweep_records()["l8mlp"]})
    plot = figures.plots(loaded)["by_layer_group"]
    assert [r["setting"] for r in plot.rows] == ["mlp.r/2"]
    plt = figure_draw.pyplot()
    fig = figure_draw.draw(plt, "by_layer_group", plot)
    try:
        assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["layer groups", "mlp.r/2"]
        assert_nothing_cut(fig, figure_draw.save(fig, "png"))
    finally:
        plt.close(fig)


def test_intervals_and_comparisons_when_the_cells_have_them(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    with_uncertainty(monkeypatch)
    rows = {r["setting"]: r for r in figures.layer_group_data(loaded, 1000.0)}
    assert rows["uniform"]["low"] == pytest.approx(6.1) and rows["uniform"]["high"] == pytest.approx(6.4)
    assert rows["uniform"]["bar"] == f"95% bootstrap interval of the mean ({HOW})"
    assert rows["mlp.r/2"]["significant"] is True and rows["mlp.r/2"]["p_holm"] == 0.004
    assert rows["mlp.r/2"]["diff"] == 0.4 and rows["uniform"]["significant"] is None
    plot = figures.plots(loaded)["by_layer_group"]
    assert any("Holm's correction over the table's 1 comparisons" in note for note in plot.notes)
    point = next(p for p in figures.pareto_data(loaded, 1000.0) if p["n"] == 2)
    assert (point["low"], point["high"]) == (pytest.approx(6.1), pytest.approx(6.4))
    assert (
        figures.plots(loaded)["pareto"].notes[1]
        == f"Error bars on the perplexity: 95% bootstrap interval of the mean ({HOW}) (5 of 5)."
    )


def test_values_from_a_limited_evaluation_are_marked(tmp_path: Path) -> None:
    records = sweep_records()
    limited(records["l8mlp"])
    loaded = load(tmp_path, records)
    (marked,) = [p for p in figures.pareto_data(loaded, 1000.0) if p["marked"]]
    assert marked["layer_group"] == "mlp.r/2" and marked["marked"] == LIMITED
    plots = figures.plots(loaded)
    assert plots["pareto"].labels[marked["key"]] == "r=8 α=16 mlp.r/2†"
    for name in ("pareto", "by_layer_group"):
        assert any(note.startswith("† hollow") and LIMITED in note for note in plots[name].notes), name
    bars = {r["setting"]: r["marked"] for r in figures.layer_group_data(loaded, 1000.0)}
    assert bars == {"uniform": "", "mlp.r/2": LIMITED}


# ------------------------------------------------------------------------------------------------ images (matplotlib)


def drawn_texts(fig) -> list:
    """Every text the saved figure shows: visible, non-empty, and for a tick label, a tick within the axis' view."""
    from matplotlib.text import Text

    fig.canvas.draw()
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            tol = 1e-9 * (hi - lo)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - tol <= tick.get_loc() <= hi + tol:
                    hidden |= {id(tick.label1), id(tick.label2)}
    return [
        text
        for text in fig.findobj(Text)
        if text.get_visible()
        and text.get_text().strip()
        and id(text) not in hidden
        and (text.axes is None or text.axes.get_visible())
    ]


def assert_nothing_cut(fig, png: bytes) -> None:
    from PIL import Image

    texts = drawn_texts(fig)
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    assert len(texts) > 8
    for text in texts:
        assert "$" not in text.get_text()  # no TeX from a formatter (text.parse_math is off: it would print as is)
        extent = text.get_window_extent(renderer)
        inside = extent.x0 >= box.x0 - 0.5 and extent.y0 >= box.y0 - 0.5
        inside = inside and extent.x1 <= box.x1 + 0.5 and extent.y1 <= box.y1 + 0.5
        assert inside, f"{text.get_text()!r} at {extent} outside the figure {box}"
    # the title and footnote (figure texts) overlap nothing, and the legend no axes
    for own in (t for t in texts if t in fig.texts):
        for other in texts:
            if other is not own:
                assert not own.get_window_extent(renderer).overlaps(other.get_window_extent(renderer)), other
    for ax in fig.axes:
        legend = ax.get_legend()
        for other in fig.axes:
            if legend is not None and other.get_visible():
                assert not legend.get_window_extent(renderer).overlaps(other.get_window_extent(renderer))
    # what is saved is that canvas: same size in pixels, at >= 200 dpi, nothing drawn on its outermost pixels
    image = Image.open(io.BytesIO(png))
    assert image.size == (round(box.width), round(box.height))
    assert min(image.info["dpi"]) >= 199.9
    pixels = image.convert("L")
    w, h = image.size
    edge = [pixels.getpixel((x, y)) for x in range(w) for y in (0, 1, h - 2, h - 1)]
    edge += [pixels.getpixel((x, y)) for y in range(h) for x in (0, 1, w - 2, w - 1)]
    assert min(edge) == 255


@pytest.mark.parametrize("case", ["sweep", "long", "long with intervals, comparisons and marks"])
def test_no_text_is_cut_off_in_any_figure(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    records = sweep_records() if case == "sweep" else long_records()
    if "marks" in case:
        with_uncertainty(monkeypatch)
        for run_id in ("v1s0", "v3s1", "q1m1oas"):
            limited(records[run_id])
    plots = figures.plots(load(tmp_path, records))
    assert sorted(plots) == ["by_layer_group", "loss_curves", "pareto"]
    plt = figure_draw.pyplot()
    for name, plot in plots.items():
        fig = figure_draw.draw(plt, name, plot)
        try:
            assert fig.texts[0].get_text().replace("\n", " ") == plot.title
            assert_nothing_cut(fig, figure_draw.save(fig, "png"))
            if name == "pareto" and case == "sweep":  # the other x axes too (log scale for the parameters)
                for x in ("bits", "params"):
                    other = figure_draw.draw(plt, name, figures.plots(load(tmp_path, records, x), pareto_x=x)[name])
                    assert_nothing_cut(other, figure_draw.save(other, "png"))
                    plt.close(other)
            if "marks" in case and name == "by_layer_group":
                # mlp.r/2: significant in both groups, in lora's also limited; first_half... of lora: only limited
                assert sorted(t.get_text() for t in fig.axes[0].texts) == ["*", "*†", "†"]
        finally:
            plt.close(fig)


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
        assert len(list(csv.DictReader(handle))) == 5  # one per configuration


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
