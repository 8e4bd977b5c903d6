"""Figures from run records: ``qpeft-bench-report RESULTS_DIR --figures`` (PNG, PDF, and each figure's data as CSV).

Three figures, each computed from the report's tables or rows so that a figure and its table never disagree:
- ``by_layer_group``: grouped bars of held-out perplexity per layer-group setting (the key-variable study's figures),
  one bar group per row of the by_layer_group pivot, error bars the sample std over seeds;
- ``pareto``: mean training memory vs. held-out perplexity per method (the Pareto front of both being low),
  completed, non-diverged runs;
- ``loss_curves``: the training loss per step of every run that recorded one.

Determinism: the data CSV is written first and the images are drawn from plain lists in a fixed order; PNG and PDF
metadata that would carry the date or the matplotlib version are fixed (CreationDate None, 'Software' set), and
svg.hashsalt is fixed, so re-running on the same records gives byte-identical files. matplotlib is imported only
here and only when a figure is drawn, so the tables work without it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qpeft_bench.report.aggregate import DEFAULT_DIVERGED_PPL, build_aggregate, is_diverged
from qpeft_bench.report.catalog import AGGREGATES
from qpeft_bench.report.formatting import GIB, fmt_text, printable, raw_value
from qpeft_bench.report.output import write_files
from qpeft_bench.report.records import LoadResult
from qpeft_bench.report.rows import is_number, records_to_rows, sort_rows
from qpeft_bench.report.tables import Agg

FIGURE_FORMATS = ("png", "pdf")
METADATA = {
    "png": {"Software": "qpeft-bench-report"},
    "pdf": {"Creator": "qpeft-bench-report", "Producer": "qpeft-bench-report", "CreationDate": None},
}


class MissingDependency(RuntimeError):
    """matplotlib is not installed (the figures need it; the tables do not)."""


# --------------------------------------------------------------------------- figure data (pure)


def layer_group_data(loaded: LoadResult, diverged_ppl: float) -> list[dict[str, Any]]:
    """One row per (by_layer_group row, layer-group column) with a value: label, setting, mean, std, n."""
    table = build_aggregate(AGGREGATES["by_layer_group"], loaded, diverged_ppl)
    n_keys = len(AGGREGATES["by_layer_group"].keys)
    out = []
    for row in table.rows:
        label = " ".join(fmt_text(row[col.key]) for col in table.spec.columns[:n_keys])
        for col in table.spec.columns[n_keys:]:
            agg = row[col.key]
            if isinstance(agg, Agg):
                out.append({"group": label, "setting": col.key, "mean": agg.mean, "std": agg.std, "n": agg.n})
    return out


def pareto_data(loaded: LoadResult, diverged_ppl: float) -> list[dict[str, Any]]:
    """One point per completed, non-diverged run with both mean memory and held-out perplexity after."""
    rows = sort_rows(records_to_rows(loaded.records), ("method_name", "r", "alpha", "run_id"))
    return [
        {
            "run_id": r["run_id"],
            "method": r["method_name"],
            "r": r["r"],
            "alpha": r["alpha"],
            "mean_memory_bytes": r["mean_memory_bytes"],
            "ppl_after": r["ppl_after"],
        }
        for r in rows
        if r["status"] == "completed"
        and not is_diverged(r, diverged_ppl)
        and is_number(r["mean_memory_bytes"])
        and is_number(r["ppl_after"])
    ]


def loss_data(loaded: LoadResult) -> list[dict[str, Any]]:
    """(run_id, step, loss) for every run that recorded its per-step losses."""
    rows = sort_rows(records_to_rows(loaded.records), ("run_id",))
    return [
        {"run_id": r["run_id"], "step": step, "loss": loss}
        for r in rows
        if isinstance(r["losses"], list)
        for step, loss in enumerate(r["losses"], start=1)
        if is_number(loss)
    ]


def data_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(list(rows[0]))
        writer.writerows([raw_value(v) for v in row.values()] for row in rows)
    return printable(buffer.getvalue())


# --------------------------------------------------------------------------- drawing


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependency("--figures needs matplotlib, which is not installed") from exc
    matplotlib.use("Agg")  # no display; also the same renderer everywhere
    matplotlib.rcParams["svg.hashsalt"] = "qpeft-bench"
    matplotlib.rcParams["pdf.compression"] = 6
    matplotlib.rcParams["text.parse_math"] = False  # a '$' in a method name or run id is text, not broken TeX
    import matplotlib.pyplot as plt

    return plt


def draw_layer_groups(plt, rows: Sequence[dict[str, Any]]):
    groups = list(dict.fromkeys(r["group"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) * max(1, len(settings)) / 2), 3.5))
    width = 0.8 / max(1, len(settings))
    for j, setting in enumerate(settings):
        xs, ys, errs = [], [], []
        for i, group in enumerate(groups):
            hit = next((r for r in rows if r["group"] == group and r["setting"] == setting), None)
            if hit is not None:
                xs.append(i + (j - (len(settings) - 1) / 2) * width)
                ys.append(hit["mean"])
                errs.append(hit["std"] or 0.0)
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=setting)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("held-out perplexity after (lower is better)")
    ax.legend(title="layer groups", fontsize=7)
    return fig


def draw_pareto(plt, rows: Sequence[dict[str, Any]]):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        ax.scatter([p["mean_memory_bytes"] / GIB for p in pts], [p["ppl_after"] for p in pts], label=str(method))
    ax.set_xlabel("mean training memory (GiB)")
    ax.set_ylabel("held-out perplexity after")
    ax.legend(fontsize=7)
    return fig


def draw_losses(plt, rows: Sequence[dict[str, Any]]):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for run_id in dict.fromkeys(r["run_id"] for r in rows):
        pts = [r for r in rows if r["run_id"] == run_id]
        ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], label=run_id)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=6)
    return fig


def figure_files(
    loaded: LoadResult, out_dir: Path, diverged_ppl: float = DEFAULT_DIVERGED_PPL
) -> dict[Path, str | bytes]:
    """<name>.csv, <name>.png and <name>.pdf under out_dir, with their content, for every figure that has data."""
    plt = _pyplot()
    figures = {
        "by_layer_group": (layer_group_data(loaded, diverged_ppl), draw_layer_groups),
        "pareto": (pareto_data(loaded, diverged_ppl), draw_pareto),
        "loss_curves": (loss_data(loaded), draw_losses),
    }
    files: dict[Path, str | bytes] = {}
    for name, (rows, draw) in figures.items():
        if not rows:
            continue
        files[out_dir / f"{name}.csv"] = data_csv(rows)
        # labels in the printable form the tables use (a non-UTF-8 name would break the PDF's text)
        fig = draw(plt, [{k: printable(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows])
        fig.tight_layout()
        for fmt in FIGURE_FORMATS:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, metadata=METADATA[fmt], dpi=100)
            files[out_dir / f"{name}.{fmt}"] = buffer.getvalue()
        plt.close(fig)
    return files


def write_figures(loaded: LoadResult, out_dir: Path, diverged_ppl: float = DEFAULT_DIVERGED_PPL) -> list[Path]:
    """Write every figure's files (all or none, output.write_files); returns the paths written."""
    return write_files(figure_files(loaded, out_dir, diverged_ppl))
