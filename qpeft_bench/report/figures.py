"""Figures from run records: ``qpeft-bench-report RESULTS_DIR --figures`` (PNG, PDF, and each figure's data as CSV).
This module computes what each figure shows (its rows, title, labels and footnotes; no matplotlib), figure_draw.py
draws it. Each figure comes from an aggregated table of the report, so that a figure and its table never disagree:
- ``pareto``: one point per configuration (the per_configuration table's rows: quantizer, method, r, alpha, layer
  groups, per model and data set, mean over seeds): held-out perplexity after fine-tuning vs. mean training memory
  (or bits per weight, or trainable parameters), the quantizer as colour and the method as marker, error bars, and
  the Pareto front of both being low;
- ``by_layer_group``: only when some run sets layer groups: bars per layer-group setting (the by_layer_group table's
  columns) with error bars, the 'uniform' baseline as a line per group and '*' on a setting whose paired comparison
  against it is significant after Holm's correction;
- ``loss_curves``: the training loss per step of every run that recorded one, labelled by what varies among them.

Error bars are the cell's interval (stats.Interval) where it has one, else ± the sample std over seeds; the CSV
(column ``bar``) and the footnote say which. A value from a limited or fixtures evaluation (rows.MARKS) is drawn
hollow with '†', and the footnote says why.

Determinism: the data CSV is written first and the images are drawn from plain lists in a fixed order; PNG and PDF
metadata that would carry the date or the matplotlib version are fixed (CreationDate None, 'Software' set), and
svg.hashsalt is fixed, so re-running on the same records gives byte-identical files.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qpeft_bench.report.aggregate import DEFAULT_DIVERGED_PPL, RUN_SETS, build_aggregate, is_diverged
from qpeft_bench.report.catalog import AGGREGATES, DATA, MODEL
from qpeft_bench.report.figure_draw import MissingDependency, Plot, draw, pyplot, save
from qpeft_bench.report.formatting import GIB, fmt_text, printable, raw_value
from qpeft_bench.report.output import write_files
from qpeft_bench.report.records import LoadResult
from qpeft_bench.report.rows import MARKS, Row, get_path, is_number, record_to_row, sort_rows
from qpeft_bench.report.tables import MARK, Agg
from qpeft_bench.report.uncertainty import Baseline, Settings

__all__ = [  # MissingDependency (figure_draw's): what the CLI catches when it asks for figure_files
    "PARETO_X",
    "MissingDependency",
    "data_csv",
    "figure_files",
    "layer_group_data",
    "loss_data",
    "pareto_data",
    "plots",
    "write_figures",
]

FIGURE_FORMATS = ("png", "pdf")


@dataclass(frozen=True)
class XAxis:
    key: str  # the per_configuration metric
    name: str  # the CSV's x_metric: what x is, in the axis' unit
    label: str
    scale: float = 1.0  # the metric's unit -> the axis' unit
    log: bool = False


PARETO_X = {
    "memory": XAxis("mean_memory_bytes", "mean_memory_GiB", "mean training memory (GiB)", GIB),
    "bits": XAxis("bits_per_weight", "bits_per_weight", "bits per weight (stored, of the quantized linears)"),
    "params": XAxis("trainable_params", "trainable_params", "trainable parameters (log scale)", log=True),
}
_PER_CONFIG = AGGREGATES["per_configuration"]
_BITS = next(col for col in AGGREGATES["model_size"].metrics if col.key == "bits_per_weight")
# per_configuration's cells (same runs, grouping and rule) in one table with model and data as keys instead of one
# table per model and data set, plus the bits per weight; mark='' keeps the method names free of the tables' '*'
# (a group with a diverged run), which in a figure would read as a significance mark
PARETO_SPEC = replace(
    _PER_CONFIG, keys=(MODEL, DATA, *_PER_CONFIG.keys), metrics=(*_PER_CONFIG.metrics, _BITS), split=(), mark=""
)
LAYER_SPEC = replace(AGGREGATES["by_layer_group"], mark="")
BASELINE = LAYER_SPEC.across_first[0]

# How a row key reads in a label, in the order labels list them; a config leaf that varies and is not one of these
# (train.lr, train.max_steps, ...) reads as '<leaf>=<value>'.
LABEL_KEYS = {
    "model": "{}",
    "dataset": "{}",
    "quant_setting": "{}",
    "method_name": "{}",
    "r": "r={}",
    "alpha": "α={}",
    "layer_group": "{}",
    "lr": "lr={}",
    "seed": "seed {}",
}
# Config sections whose leaves can change a loss curve; the leaves LABEL_KEYS already says, and those that only say
# where things are or how often to log, are left out.
CURVE_SECTIONS = ("train", "peft", "data")
COVERED = {"peft.method", "peft.name", "peft.r", "peft.alpha", "peft.variant", "peft.by_layer", "data.name", "train.lr"}
NOISE = {"path", "hub_id", "device", "log_every", "save_adapter", "checkpoint_every"}


# --------------------------------------------------------------------------- figure data (pure)


def spread(agg: Agg) -> tuple[float | None, float | None, str]:
    """(low, high, what they are) of a cell's error bar: its interval, else mean ± sample std, else none."""
    if agg.interval is not None:
        how = f" ({agg.interval.how})" if agg.interval.how else ""
        return agg.interval.low, agg.interval.high, f"{agg.interval.level:.0%} bootstrap interval of the mean{how}"
    std = agg.std
    if std is not None and math.isfinite(std):
        return agg.mean - std, agg.mean + std, "± 1 sample std over seeds"
    return None, None, ""


def pareto_data(
    loaded: LoadResult, diverged_ppl: float, x: str = "memory", settings: Settings | None = None
) -> list[dict[str, Any]]:
    """One point per configuration with a finite held-out perplexity after and x value; ``front`` marks the Pareto
    front (no point of the same model and data set is lower in both) and ``key`` names the point for its label."""
    axis = PARETO_X[x]
    points = []
    # intervals only: the figure shows no comparisons (the layer-group one does)
    settings = replace(settings or Settings(), baseline=Baseline(()))
    for row in build_aggregate(PARETO_SPEC, loaded, diverged_ppl, None, settings).rows:
        ppl, xs = row["ppl_after"], row[axis.key]
        if not (isinstance(ppl, Agg) and isinstance(xs, Agg) and _finite(ppl.mean) and _finite(xs.mean)):
            continue
        if axis.log and xs.mean <= 0:  # no place on a log axis (a run without trainable parameters)
            continue
        low, high, bar = spread(ppl)
        points.append(
            {
                "model": row["model"],
                "data": row["dataset"],
                "quant": row["quant_setting"],
                "method": row["method_name"],
                "r": row["r"],
                "alpha": row["alpha"],
                "layer_group": row["layer_group"],
                "x_metric": axis.name,
                "x": xs.mean / axis.scale,
                "y": ppl.mean,
                "low": low,
                "high": high,
                "bar": bar,
                "n": ppl.n,
                "front": False,
                "marked": "; ".join(row[MARKS][k] for k in ("ppl_after", axis.key) if k in row[MARKS]),
                "key": f"p{len(points)}",
            }
        )
    best: dict[tuple, float] = {}
    for point in sorted(points, key=lambda p: (p["x"], p["y"])):
        panel = (point["model"], point["data"])
        if point["y"] < best.get(panel, math.inf):
            point["front"], best[panel] = True, point["y"]
    return points


def layer_group_data(loaded: LoadResult, diverged_ppl: float, settings: Settings | None = None) -> list[dict[str, Any]]:
    """One row per (by_layer_group row, layer-group setting) with a value, for the rows that have a setting besides
    the baseline: the mean, std, n, error bar and, where the table has one, the comparison against the baseline."""
    # the baseline is the drawn 'uniform' line, whatever --baseline names for the tables
    settings = replace(settings or Settings(), baseline=Baseline())
    table = build_aggregate(LAYER_SPEC, loaded, diverged_ppl, None, settings)
    keys = [col.key for col in LAYER_SPEC.keys]
    out = []
    for row in table.rows:
        cells = {col.key: row[col.key] for col in table.spec.columns[len(keys) :] if isinstance(row[col.key], Agg)}
        if not any(setting != BASELINE for setting in cells):
            continue  # nothing to compare: the by_layer_group table shows it
        group = " ".join(fmt_text(row[k]) for k in keys)
        for setting, agg in cells.items():
            low, high, bar = spread(agg)
            c = agg.comparison
            out.append(
                {
                    "group": group,
                    **{k: row[k] for k in keys},
                    "setting": setting,
                    "mean": agg.mean,
                    "std": agg.std,
                    "n": agg.n,
                    "low": low,
                    "high": high,
                    "bar": bar,
                    "baseline": BASELINE,
                    "diff": c.diff if c else None,
                    "diff_low": c.low if c else None,
                    "diff_high": c.high if c else None,
                    "p": c.p if c else None,
                    "p_holm": c.p_holm if c else None,
                    "significant": c.significant if c else None,
                    "level": c.level if c else None,
                    "marked": row[MARKS].get(setting, ""),
                }
            )
    return out


def loss_data(loaded: LoadResult, diverged_ppl: float = DEFAULT_DIVERGED_PPL) -> list[dict[str, Any]]:
    """(run_id, label, step, loss) for every run that recorded its per-step losses; the label says what varies
    among those runs (run_labels)."""
    return _losses(loaded, diverged_ppl)[0]


def _losses(loaded: LoadResult, diverged_ppl: float) -> tuple[list[dict[str, Any]], str]:
    rows = []
    for record in loaded.records:
        row = record_to_row(record)
        if isinstance(row["losses"], list) and any(_finite(v) for v in row["losses"]):
            lr = get_path(record.data, ("config", "train", "lr"))
            rows.append({**row, "lr": lr, "config_leaves": _leaves(record.data.get("config"))})
    rows = sort_rows(rows, (*LABEL_KEYS, "run_id"))
    labels, shared = run_labels(rows, diverged_ppl)
    points = [
        {"run_id": r["run_id"], "label": labels[r["run_id"]], "step": step, "loss": loss}
        for r in rows
        for step, loss in enumerate(r["losses"], start=1)
        if _finite(loss)  # a diverged run's inf or nan steps have no place on the axis
    ]
    return points, shared


def run_labels(rows: Sequence[Row], diverged_ppl: float = DEFAULT_DIVERGED_PPL) -> tuple[dict[str, str], str]:
    """({run id: label}, what all share): a label lists the LABEL_KEYS and config leaves whose values differ among
    the runs ('lora r=8 α=16 seed 0'; a leaf only where the LABEL_KEYS do not already tell it, as peft.use_rslora
    follows from the method); with nothing differing, the method, r and alpha. Never the run id: two runs whose
    label is the same are numbered (#2)."""
    leaves = sorted({k for r in rows for k in r.get("config_leaves", {})})
    parts = {r["run_id"]: [] for r in rows}
    varying = [k for k in LABEL_KEYS if len({fmt_text(r.get(k)) for r in rows}) > 1]
    extra = [
        k for k in leaves if len({fmt_text(r["config_leaves"].get(k)) for r in rows}) > 1 and not _follows(rows, k)
    ]
    for r in rows:
        said = [_say(LABEL_KEYS[k], r.get(k)) for k in varying or ("method_name", "r", "alpha")]
        said += [_say(f"{k.rsplit('.', 1)[-1]}={{}}", r["config_leaves"].get(k)) for k in extra]
        if r["status"] in ("completed", "diverged") and is_diverged(r, diverged_ppl):
            said.append("(diverged)")
        parts[r["run_id"]] = [s for s in said if s]
    labels, seen = {}, Counter()
    for run_id, said in parts.items():
        label = " ".join(said) or "run"
        seen[label] += 1
        labels[run_id] = label if seen[label] == 1 else f"{label} #{seen[label]}"
    shared = [
        _say(LABEL_KEYS[k], rows[0].get(k)) for k in ("model", "dataset", "quant_setting") if k not in varying and rows
    ]
    return labels, ", ".join(s for s in shared if s)


def data_csv(rows: Sequence[dict[str, Any]], leave_out: Iterable[str] = ()) -> str:
    skip = set(leave_out)
    buffer = io.StringIO()
    if rows:
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([k for k in rows[0] if k not in skip])
        writer.writerows([raw_value(v) for k, v in row.items() if k not in skip] for row in rows)
    return printable(buffer.getvalue())


# --------------------------------------------------------------------------- titles, labels and footnotes


def bar_note(rows: Sequence[dict[str, Any]], what: str) -> str:
    kinds = Counter(r["bar"] for r in rows)
    parts = [f"{kind or 'none (a single run, no interval)'} ({count} of {len(rows)})" for kind, count in kinds.items()]
    return f"Error bars on the {what}: " + "; ".join(parts) + "."


def mark_note(rows: Sequence[dict[str, Any]]) -> list[str]:
    whys = sorted({r["marked"] for r in rows if r["marked"]})
    if not whys:
        return []
    return [
        f"{MARK} hollow: from a limited or fixtures evaluation, not the full benchmark and not comparable with "
        f"published numbers: {'; '.join(whys)}."
    ]


def pareto_plot(loaded: LoadResult, diverged_ppl: float, x: str = "memory", settings: Settings | None = None) -> Plot:
    rows = pareto_data(loaded, diverged_ppl, x, settings)
    axis = PARETO_X[x]
    # a point is labelled with what tells it from the others: r and α only where they vary (said once otherwise)
    varies = {k: len({fmt_text(p[k]) for p in rows}) > 1 for k in ("r", "alpha", "layer_group")}
    labels = {}
    for p in rows:
        tag = [_say(LABEL_KEYS[k], p[k]) for k in ("r", "alpha") if varies[k]]
        tag.append(p["layer_group"] if varies["layer_group"] else "")
        labels[p["key"]] = " ".join(t for t in tag if t) + (MARK if p["marked"] else "")
    fixed = ", ".join(_say(LABEL_KEYS[k], rows[0][k]) for k in ("r", "alpha") if rows and not varies[k])
    notes = [
        "One point per configuration (quantizer, method, r, α, layer groups), the mean over its seeds (n in the "
        f"CSV), as in the per_configuration table{f'; every point has {fixed}' if fixed else ''}. Runs: "
        f"{RUN_SETS[PARETO_SPEC.runs]}. Dashed line: the Pareto front, the points no other point of the panel beats "
        "in both.",
        bar_note(rows, "perplexity"),
        *mark_note(rows),
    ]
    title = f"Held-out perplexity after fine-tuning vs. {axis.label.split(' (')[0]}, per configuration"
    return Plot(rows, title, notes, labels, x_label=axis.label, x_log=axis.log)


def layer_group_plot(loaded: LoadResult, diverged_ppl: float, settings: Settings | None = None) -> Plot:
    rows = layer_group_data(loaded, diverged_ppl, settings)
    groups = {r["group"]: r for r in rows}
    keys = [col.key for col in LAYER_SPEC.keys]
    varying = [k for k in keys if len({fmt_text(r[k]) for r in groups.values()}) > 1] or ["method_name", "r"]
    labels = {g: " ".join(_say(LABEL_KEYS[k], r[k]) for k in varying) for g, r in groups.items()}
    shared = ", ".join(s for k in keys if k not in varying and (s := _say(LABEL_KEYS[k], rows[0][k]))) if rows else ""
    compared = [r for r in rows if r["p_holm"] is not None]
    if compared:
        level = compared[0]["level"]
        significance = (
            f"* the setting's difference to '{BASELINE}' (same model, data, quantizer, method and r), on the same "
            f"items: its {level:.0%} paired-bootstrap interval excludes zero after Holm's correction over the "
            f"table's {len(compared)} comparisons. The CSV has every difference, its interval and p."
        )
    else:
        significance = "No significance marks: there is no paired comparison (no per-item results to compare on)."
    notes = [
        f"Bars: the mean over seeds per layer-group setting; line: the '{BASELINE}' baseline of the same group, its "
        "error bar shaded. Runs: " + RUN_SETS[LAYER_SPEC.runs] + ".",
        bar_note(rows, "means"),
        significance,
        *mark_note(rows),
    ]
    title = "Held-out perplexity after fine-tuning by layer-group setting" + (f": {shared}" if shared else "")
    return Plot(rows, title, notes, labels)


def loss_plot(loaded: LoadResult, diverged_ppl: float) -> Plot:
    rows, shared = _losses(loaded, diverged_ppl)
    # 'seed 0' kept on one line when a legend entry wraps
    labels = {r["run_id"]: r["label"].replace("seed ", "seed\u00a0") for r in rows}
    title = "Training loss per step" + (f": {shared}" if shared else "")
    return Plot(rows, title, [], labels)


def plots(
    loaded: LoadResult,
    diverged_ppl: float = DEFAULT_DIVERGED_PPL,
    pareto_x: str = "memory",
    settings: Settings | None = None,
) -> dict[str, Plot]:
    """Every figure that has data, by name (the file stem), in the printable form the tables use (a non-UTF-8 name
    would break the PDF's text). pareto_x: the Pareto figure's x axis, a PARETO_X key (memory, bits, params)."""
    made = {
        "by_layer_group": layer_group_plot(loaded, diverged_ppl, settings),
        "pareto": pareto_plot(loaded, diverged_ppl, pareto_x, settings),
        "loss_curves": loss_plot(loaded, diverged_ppl),
    }
    return {name: _printable(plot) for name, plot in made.items() if plot.rows}


def figure_files(
    loaded: LoadResult,
    out_dir: Path,
    diverged_ppl: float = DEFAULT_DIVERGED_PPL,
    pareto_x: str = "memory",
    settings: Settings | None = None,
) -> dict[Path, str | bytes]:
    """<name>.csv, <name>.png and <name>.pdf under out_dir, with their content, for every figure that has data."""
    plt = pyplot()
    files: dict[Path, str | bytes] = {}
    for name, plot in plots(loaded, diverged_ppl, pareto_x, settings).items():
        files[out_dir / f"{name}.csv"] = data_csv(plot.rows, leave_out=("key",))
        fig = draw(plt, name, plot)
        for fmt in FIGURE_FORMATS:
            files[out_dir / f"{name}.{fmt}"] = save(fig, fmt)
        plt.close(fig)
    return files


def write_figures(
    loaded: LoadResult, out_dir: Path, diverged_ppl: float = DEFAULT_DIVERGED_PPL, pareto_x: str = "memory"
) -> list[Path]:
    """Write every figure's files (all or none, output.write_files); returns the paths written."""
    return write_files(figure_files(loaded, out_dir, diverged_ppl, pareto_x))


# --------------------------------------------------------------------------- helpers


def _finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _follows(rows: Sequence[Row], leaf: str) -> bool:
    """Whether runs that agree in every LABEL_KEYS value agree in the config leaf too (it says nothing new)."""
    seen: dict[tuple, str] = {}
    for r in rows:
        value = fmt_text(r["config_leaves"].get(leaf))
        if seen.setdefault(tuple(fmt_text(r.get(k)) for k in LABEL_KEYS), value) != value:
            return False
    return True


def _say(template: str, value: Any) -> str:
    if value is None or value == "":
        return ""
    return template.format(f"{value:g}" if isinstance(value, float) else value)


def _leaves(config: Any) -> dict[str, Any]:
    """The scalar leaves of a run's config sections that can change its loss curve, as {'train.lr': 0.001}."""
    out: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if path in COVERED or path.rsplit(".", 1)[-1] in NOISE:
            return
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif not isinstance(node, list):
            out[path] = node

    if isinstance(config, dict):
        for section in CURVE_SECTIONS:
            if isinstance(config.get(section), dict):
                walk(config[section], section)
    return out


def _printable(plot: Plot) -> Plot:
    def text(value: Any) -> Any:
        return printable(value) if isinstance(value, str) else value

    rows = [{k: text(v) for k, v in row.items()} for row in plot.rows]
    labels = {text(k): text(v) for k, v in plot.labels.items()}
    return replace(plot, rows=rows, labels=labels, title=text(plot.title), notes=[text(n) for n in plot.notes])
