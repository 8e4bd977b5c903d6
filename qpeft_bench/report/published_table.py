"""The `published` table: our runs grouped into cells by every key a published row can name (model, data,
quantizer, method, r, alpha, layer groups and the knobs a setting names), each published row matched to its cells,
and per pair the published value, ours, Δ and whether the published value lies in our interval."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from qpeft_bench import families
from qpeft_bench.report.aggregate import AggSpec, build_aggregate
from qpeft_bench.report.formatting import fmt_count, fmt_text
from qpeft_bench.report.published import (
    DATA,
    METHODS,
    MODELS,
    NOT_RUNNABLE,
    QUANTS,
    UNITS,
    Published,
    PublishedRow,
    mapped_fields,
    metric_field,
)
from qpeft_bench.report.records import LoadResult, RunRecord
from qpeft_bench.report.reference import key_norm
from qpeft_bench.report.rows import Row, get_path, is_number
from qpeft_bench.report.stats import Interval
from qpeft_bench.report.tables import Agg, Column, Table, TableSpec, fmt_agg, unreadable_notes
from qpeft_bench.report.uncertainty import Baseline, Settings

# ---- Our cells: runs grouped by every key a published row can name
CELL_KEYS = ("model", "dataset", "quant", "quant_setting", "quant_bits", "quant_nbits", "quant_group_size")
CELL_KEYS += ("method_name", "r", "alpha", "layer_group")
# knobs a setting names that the report's rows do not carry: (first of these record paths that is set)
EXTRAS = {
    "k": (("config", "quant", "k"), ("config", "peft", "k")),
    "targets": (("config", "peft", "targets"),),
    "lambda1": (("config", "peft", "lambda1"),),
    "lambda2": (("config", "peft", "lambda2"),),
    "lr": (("config", "train", "lr"),),
}
MLP_LINEARS = frozenset(families.type_groups()["mlp"])
FIELDS = sorted({f for m in mapped_fields() for f in (m.after, m.before) if f})
CELLS = AggSpec(
    name="published",
    title="our cells",
    keys=tuple(Column(key, key) for key in CELL_KEYS),
    metrics=tuple(Column(key, key, agg=True) for key in FIELDS),
    rule="mean_seeds",
    runs="quality",
    mark="",  # no '*' on a key: the keys are matched
)


@dataclass
class Cell:
    keys: dict[str, Any]
    aggs: dict[str, Agg]
    used: set[str] = field(default_factory=set)  # fields a published row was matched with

    def describe(self) -> str:
        k = self.keys
        knobs = [f"{n}={fmt_text(k[n])}" for n in ("r", "alpha", "k") if k[n] is not None]
        parts = [k["model"], k["dataset"], k["quant_setting"], k["method_name"], *knobs, k["layer_group"]]
        return " ".join(fmt_text(part) for part in parts if part is not None)


def record_extras(record: RunRecord) -> tuple[tuple[str, Any], ...]:
    out = []
    for name, paths in EXTRAS.items():
        value = next((v for v in (get_path(record.data, p) for p in paths) if v is not None), None)
        if name == "targets":  # null: every linear; the FFN's linears alone: 'mlp' (the Platypus recipe)
            names = value if isinstance(value, list) else [value]
            value = (
                "all" if value is None else "mlp" if set(map(str, names)) <= MLP_LINEARS else ",".join(map(str, names))
            )
        out.append((name, value))
    return tuple(out)


def our_cells(
    loaded: LoadResult, diverged_ppl: float, settings: Settings | None = None
) -> tuple[list[Cell], list[str]]:
    """The cells (mean over seeds of each group of runs, with their intervals) and the notes of their aggregation
    (diverged runs, ...). No comparisons: a published row is compared with our cell, not our cells with each
    other."""
    settings = replace(settings or Settings(), baseline=Baseline(()))
    parts: dict[tuple, list[RunRecord]] = defaultdict(list)
    for record in loaded.records:
        parts[record_extras(record)].append(record)
    cells, notes = [], []
    for extras, records in sorted(parts.items(), key=lambda kv: repr(kv[0])):
        table = build_aggregate(CELLS, replace(loaded, records=records), diverged_ppl, None, settings)
        notes += [note for note in table.notes if note not in notes]
        for row in table.rows:
            aggs = {key: row[key] for key in FIELDS if isinstance(row.get(key), Agg)}
            cells.append(Cell(keys={**{k: row[k] for k in CELL_KEYS}, **dict(extras)}, aggs=aggs))
    return cells, notes


# ---- Matching
def wanted(row: PublishedRow) -> tuple[dict[str, Any], str] | str:
    """({cell key: the value a matching cell holds}, our field) for a row, or why it cannot be compared."""
    setting, source, metric = row.setting, row["source"], row["metric"]
    if setting.kind in ("not_reproducible", "quantization"):
        return f"not reproducible: {setting.why}"
    if MODELS[row["model"]] is None:
        return f"model {row['model']} {NOT_RUNNABLE['model']}"
    found = metric_field(source, metric)
    if found is None:
        return f"{metric}: {NOT_RUNNABLE.get(metric, 'no record field for it in the ' + source + ' study')}"
    if row.value is None:
        return "no number printed (" + (row["notes"].split(";")[0] or "empty") + ")"
    quant, bits_key = QUANTS[row["quant"]]
    want: dict[str, Any] = {"model": MODELS[row["model"]], "quant": quant}
    if bits_key and row["bits"]:
        want[bits_key] = int(row["bits"])
    if setting.kind == "base":
        if found.before is None:
            return f"{metric}: records keep no value before fine-tuning"
        return want, found.before
    want |= {"method_name": METHODS[row["method"]], "layer_group": setting.layer_group}
    want |= {n: v for n, v in (("dataset", DATA[row["data"]]), ("r", row.number_of("r"))) if v}
    want |= {n: v for n, v in (("alpha", row.number_of("alpha")), ("k", setting.k), ("lr", setting.lr)) if v}
    want |= {n: v for n, v in (("quant_group_size", setting.group_size), ("targets", setting.targets)) if v}
    if setting.lambdas:
        want |= {"lambda1": setting.lambdas[0], "lambda2": setting.lambdas[1]}
    return want, found.after


def _holds(cell: Cell, want: Mapping[str, Any]) -> bool:
    for key, value in want.items():
        ours = cell.keys.get(key)
        if key == "lr":
            if not (is_number(ours) and math.isclose(ours, value, rel_tol=1e-9)):
                return False
        elif key_norm(ours) != key_norm(value):
            return False
    return True


@dataclass(frozen=True)
class Pair:
    row: PublishedRow
    ours: Agg  # in the published unit
    cell: str  # which of our cells (or their mean)
    field: str


def match(published: Published, cells: list[Cell]) -> tuple[list[Pair], dict[str, list[PublishedRow]]]:
    """Every (our cell, published row) pair, and the rows without one by reason."""
    pairs: list[Pair] = []
    unmatched: dict[str, list[PublishedRow]] = defaultdict(list)
    for row in published.rows:
        found = wanted(row)
        if isinstance(found, str):
            unmatched[found].append(row)
            continue
        want, key = found
        hits = [c for c in cells if key in c.aggs and _holds(c, want)]
        if row.setting.kind == "mean":
            hits = [c for c in hits if (c.keys["r"], c.keys["alpha"]) in row.configs]
            lacking = set(row.configs) - {(c.keys["r"], c.keys["alpha"]) for c in hits}
            if hits and lacking:
                configs = ", ".join(f"r={r} alpha={a}" for r, a in sorted(lacking))
                unmatched[f"a mean over configurations, ours lacks {configs}"].append(row)
                continue
        if not hits:
            unmatched["no run of ours"].append(row)
            continue
        for cell in hits:
            cell.used.add(key)
        if row.setting.kind in ("mean", "base"):  # one cell: every run of the configurations / of the base
            k = hits[0].keys
            runs = sum(c.aggs[key].n for c in hits)
            if row.setting.kind == "mean":
                what = f"{k['dataset']} {k['quant_setting']} {k['method_name']}, {len(hits)} configurations"
            else:
                what = f"{k['quant_setting']}, before fine-tuning"
            described = [f"{k['model']} {what} ({runs} runs)"]
            hits = [Cell(keys=k, aggs={key: Agg(tuple(v for c in hits for v in c.aggs[key].values))})]
        else:
            described = [c.describe() for c in hits]
        factor = UNITS[row["unit"]]
        for cell, text in zip(hits, described, strict=True):
            pairs.append(Pair(row, scaled(cell.aggs[key], factor), text, key))
    return pairs, unmatched


def scaled(agg: Agg, factor: float) -> Agg:
    interval = agg.interval
    if interval is not None:
        interval = replace(interval, low=interval.low * factor, high=interval.high * factor)
    return replace(agg, values=tuple(v * factor for v in agg.values), interval=interval, comparison=None)


# ---- The table
def interval_text(interval: Interval | None) -> str:
    return "—" if interval is None else f"[{interval.low:.6g}, {interval.high:.6g}]"


def _sig(value: Any) -> str:
    if not is_number(value):
        return fmt_text(value)
    # the spread of equal values after a unit conversion (4.7e-16) is no spread
    return "0" if abs(value) < 1e-12 else f"{value:.6g}"


def _delta(value: Any) -> str:
    # float noise of a unit conversion (0.453 x 100) is no difference
    return "" if value is None else "0" if abs(value) < 1e-9 else f"{value:+.4g}"


PUBLISHED = TableSpec(
    name="published",
    title="Published values side by side",
    columns=(
        *(Column(k, k) for k in ("source", "table", "model", "data", "quant", "bits", "method")),
        Column("r", "r", fmt_count, align="right"),
        Column("alpha", "alpha", fmt_count, align="right"),
        Column("setting", "setting"),
        Column("metric", "metric"),
        Column("published", "published", _sig, align="right"),
        Column("unit", "unit"),
        Column("ours", "ours", fmt_agg(_sig, show_n=True), align="right", agg=True),
        Column("interval", "ours 95% interval", align="right"),
        Column("delta", "Δ", _delta, align="right"),
        Column("in_interval", "in interval"),
        Column("our_cell", "our cell"),
    ),
    csv_extra=("interval_low", "interval_high", "our_field", "published_row"),
)


def build_published(
    loaded: LoadResult, published: Published, diverged_ppl: float, settings: Settings | None = None
) -> Table:
    """The `published` table: one row per (published row, our cell) pair, with the notes that say what was not
    matched and why."""
    cells, cell_notes = our_cells(loaded, diverged_ppl, settings)
    pairs, unmatched = match(published, cells)
    rows: list[Row] = []
    for pair in pairs:
        row: Row = {k: pair.row[k] or None for k in ("source", "table", "model", "data", "quant", "bits", "method")}
        interval = pair.ours.interval
        row |= {"r": pair.row.number_of("r"), "alpha": pair.row.number_of("alpha"), "setting": pair.row["setting"]}
        row |= {"metric": pair.row["metric"], "published": pair.row.value, "unit": pair.row["unit"], "ours": pair.ours}
        row |= {"interval": interval_text(interval), "delta": pair.ours.mean - pair.row.value}
        row |= {"our_cell": pair.cell}
        row |= {"in_interval": "—" if interval is None else "yes" if interval.covers(pair.row.value) else "no"}
        row |= {"interval_low": interval and interval.low, "interval_high": interval and interval.high}
        row |= {"our_field": pair.field, "published_row": pair.row.number}
        rows.append(row)
    matched = len({pair.row.number for pair in pairs})
    notes = [
        f"{published.path}: {matched} of {len(published.rows)} published rows matched ({len(pairs)} pairs with our "
        "cells; each row cites its source table). Δ = ours - published, in the published unit (our fractions x 100 "
        "for %, bytes / 2^30 for GB, parameters / 10^6 for M). in interval: whether the published value lies in our "
        "cell's 95% interval (— where the cell has none).",
        "Ours: mean ± std (n) over the seeds of one configuration; a row that averages a table's (r, alpha) "
        "configurations against our mean over every run of the same configurations; a no-fine-tuning row against "
        "the evaluation before fine-tuning of every run of that model and quantizer.",
        *(f"Intervals: {how}." for how in sorted({p.ours.interval.how for p in pairs if p.ours.interval}) if how),
        *(note for note in cell_notes if not note.startswith("Cells:")),  # how our cells average is said above
    ]
    for reason, missed in sorted(unmatched.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        where = Counter(f"{r['source']} {r['table']}" for r in missed)
        listed = ", ".join(f"{t} ({n})" for t, n in sorted(where.items()))
        notes.append(f"not matched, {reason}: {len(missed)} row{'s' * (len(missed) != 1)}: {listed}")
    # a cell whose results after fine-tuning no row speaks of (its evaluation before is the base rows' business)
    before = {f.before for f in mapped_fields()}
    alone = [c.describe() for c in cells if not (c.used - before) and set(c.aggs) - before]
    if alone:
        notes.append(f"ours without a published row ({len(alone)} cells): " + "; ".join(alone))
    return Table(spec=PUBLISHED, rows=rows, notes=[*notes, *unreadable_notes(loaded.unreadable)])
