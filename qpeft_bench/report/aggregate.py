"""Aggregated tables (the thesis' layout): rows are groups of runs, cells the mean ± std (n) of a metric over the
group's runs (an AggSpec says which runs, grouped how, pivoted or not); diverged runs are marked and left out of the
quality means."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Any

import qpeft_bench.report.uncertainty as uncertainty
from qpeft_bench.report.formatting import fmt_text
from qpeft_bench.report.records import LoadResult, RunRecord
from qpeft_bench.report.reference import Reference, add_reference, key_norm
from qpeft_bench.report.rows import MARKS, Row, is_number, record_to_row, records_to_rows, sort_value
from qpeft_bench.report.tables import Agg, Column, Table, TableSpec, coverage_notes, duplicate_notes, unreadable_notes

DEFAULT_DIVERGED_PPL = 1000.0
# The perplexities (after, before) that decide divergence: a run whose loss blew up shows it in every one of them.
DIVERGENCE_METRICS = (("ppl_after", "ppl_before"), ("wikitext_ppl_after", "wikitext_ppl_before"))


def is_diverged(row: Row, threshold: float) -> bool:
    """Status diverged, or a perplexity after fine-tuning above threshold (inf and nan count as above) that is not
    below the same perplexity before fine-tuning: a small model briefly trained can sit above 1000 and still have
    improved (the embedded model starts near 1900 on its instruction format), which is not a divergence."""
    if row["status"] == "diverged":
        return True
    for after_key, before_key in DIVERGENCE_METRICS:
        after, before = row.get(after_key), row.get(before_key)
        if is_number(after) and not float(after) <= threshold:
            if not (is_number(before) and float(after) < float(before)):
                return True
    return False


# Which runs enter an aggregated table's cells.
RUN_SETS = {
    # accounting follows from the configuration, so a planned or failed run's numbers are as good as a completed one's
    "any": "every record that holds the value (planned and failed runs included: accounting needs no training)",
    # memory and time were measured while training, which a run that later diverged did too
    "trained": "completed and diverged runs",
    "quality": "completed runs that did not diverge",
}
RULES = {
    "value": "one value per configuration (mean ± std (n) shown where records disagree)",
    "mean_seeds": "mean ± sample std over seeds (n runs)",
    "mean_configs": "mean ± sample std over configurations and seeds (n runs)",
}


@dataclass(frozen=True)
class AggSpec:
    """A table whose rows are groups of runs: ``keys`` group, ``metrics`` are aggregated over each group's runs by
    ``rule`` (a RULES key). With ``across`` set (one metric), the distinct values of that row key become the columns
    (a pivot, e.g. data sets or layer-group settings)."""

    name: str
    title: str
    keys: tuple[Column, ...]
    metrics: tuple[Column, ...]
    rule: str
    runs: str  # a RUN_SETS key
    across: str | None = None
    across_first: tuple[str, ...] = ()  # pivot columns to put first (the baseline)
    mark: str = "method_name"  # key column that carries the '*' of a group with diverged runs
    notes: tuple[str, ...] = ()
    # one table per distinct value of these row keys (the thesis' appendix has one per model and data set); each is
    # named <name>_<values> and built from its own runs only, so its notes list only its own diverged runs
    split: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rule not in RULES or self.runs not in RUN_SETS:
            raise ValueError(f"{self.name}: rule {self.rule!r} / runs {self.runs!r} unknown")
        if self.across is not None and len(self.metrics) != 1:
            raise ValueError(f"{self.name}: a pivot (across={self.across}) takes exactly one metric")


def build_aggregate(
    spec: AggSpec,
    loaded: LoadResult,
    diverged_ppl: float = DEFAULT_DIVERGED_PPL,
    reference: Reference | None = None,
    settings: uncertainty.Settings | None = None,
) -> Table:
    rows = records_to_rows(loaded.records)
    key_names = [col.key for col in spec.keys]
    metric_keys = [col.key for col in spec.metrics]
    quality = spec.runs == "quality"
    entered: list[Row] = []
    left_out: Counter[str] = Counter()
    diverged: dict[tuple, list[str]] = defaultdict(list)
    for row in rows:
        trained = row["status"] in ("completed", "diverged")
        if quality and trained and is_diverged(row, diverged_ppl):
            diverged[tuple(row[k] for k in key_names)].append(row["run_id"])
        elif spec.runs == "any" or row["status"] == "completed" or (trained and not quality):
            entered.append(row)
        else:
            left_out[row["status"]] += 1
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    members: dict[tuple, list[Row]] = defaultdict(list)  # (group, cell) -> the runs whose value entered it
    # (group, cell) -> (run id, why) of each run whose value entered it from a limited or fixtures evaluation
    marked: dict[tuple, list[tuple[str, str]]] = defaultdict(list)
    across_values: list[Any] = []
    for row in entered:
        group_key = tuple(row[k] for k in key_names)
        group = cells[group_key]
        if spec.across is not None:
            value = row[spec.metrics[0].key]
            if is_number(value):
                group[row[spec.across]].append(float(value) if isinstance(value, float) else value)
                members[group_key, str(row[spec.across])].append(row)
                if row[spec.across] not in across_values:
                    across_values.append(row[spec.across])
                if spec.metrics[0].key in row[MARKS]:
                    marked[group_key, str(row[spec.across])].append((row["run_id"], row[MARKS][spec.metrics[0].key]))
            continue
        for key in metric_keys:
            if is_number(row[key]):
                group[key].append(row[key])
                members[group_key, key].append(row)
                if key in row[MARKS]:
                    marked[group_key, key].append((row["run_id"], row[MARKS][key]))
    for group_key in diverged:
        cells[group_key]  # a group whose every run diverged still gets its (marked, empty) row
    groups = sorted(
        (k for k in cells if any(cells[k].values()) or k in diverged), key=lambda k: tuple(sort_value(v) for v in k)
    )

    if spec.across is not None:
        across_values.sort(key=lambda v: (v not in spec.across_first, sort_value(v)))
        metric = spec.metrics[0]
        value_cols = tuple(replace(metric, key=str(v), header=str(v)) for v in across_values)
        lookup = {str(v): v for v in across_values}
    else:
        value_cols = spec.metrics
        lookup = {key: key for key in metric_keys}
    out = []
    for group_key in groups:
        row = dict(zip(key_names, group_key, strict=True))
        if group_key in diverged and spec.mark in row:
            row[spec.mark] = f"{row[spec.mark]}*"
        for col in value_cols:
            values = cells[group_key].get(lookup[col.key], [])
            row[col.key] = Agg(tuple(values)) if values else None
        # a mean is marked when any run that entered it is
        row[MARKS] = {
            col.key: "; ".join(sorted({why for _, why in marked[group_key, col.key]}))
            for col in value_cols
            if marked.get((group_key, col.key))
        }
        out.append(row)
    headers = {col.key: col.header for col in value_cols}
    if spec.across is not None:
        headers = {key: f"{spec.metrics[0].header} ({spec.across} {key})" for key in headers}
    coverage = coverage_notes(
        (run_id, headers[col_key], why) for (_, col_key), runs in marked.items() for run_id, why in runs
    )

    notes = [f"Cells: {RULES[spec.rule]}. Runs: {RUN_SETS[spec.runs]}.", *spec.notes]
    if diverged:
        listed = "; ".join(
            f"{' '.join(fmt_text(v) for v in k)}: {', '.join(sorted(ids))}"
            for k, ids in sorted(diverged.items(), key=lambda kv: [sort_value(v) for v in kv[0]])
        )
        notes.append(
            f"* diverged (status diverged, or perplexity after > {diverged_ppl:g} and not below before), "
            "excluded from the means: "
            f"{listed}"
        )
    if left_out:
        notes.append(
            "left out, not trained to the end: "
            + ", ".join(f"{count} {status}" for status, count in sorted(left_out.items()))
        )
    notes += [*coverage, *duplicate_notes(loaded.duplicates)]
    tested: list[uncertainty.Tested] = []
    if quality:
        settings = settings or uncertainty.Settings()
        tested, stat_notes = _add_stats(spec, groups, out, value_cols, members, settings, lookup)
        notes += stat_notes
    columns = (*spec.keys, *value_cols)
    table_spec = TableSpec(name=spec.name, title=spec.title, columns=columns, csv_extra=())
    table = Table(spec=table_spec, rows=out, notes=[*notes, *unreadable_notes(loaded.unreadable)], tested=tested)
    if reference is not None and spec.across is None:
        table = add_reference(table, key_names, reference)
    return table


def _add_stats(
    spec: AggSpec,
    groups: list[tuple],
    out: list[Row],
    value_cols: tuple[Column, ...],
    members: dict[tuple, list[Row]],
    settings: uncertainty.Settings,
    lookup: dict[str, Any],
) -> tuple[list[uncertainty.Tested], list[str]]:
    """Intervals on every quality cell and comparisons against the baselines, written into the table's Agg cells;
    returns the comparisons and the notes that explain them."""
    source = uncertainty.ItemSource()
    key_names = [col.key for col in spec.keys]
    metric_of = {col.key: (spec.metrics[0].key if spec.across is not None else col.key) for col in value_cols}
    stat_cols = [col for col in value_cols if uncertainty.item_selector(metric_of[col.key]) is not None]
    pairs = []
    for group_key in groups:
        for col in stat_cols:
            base = _baseline_cell(spec, group_key, col.key, key_names, settings.baseline, set(groups), lookup)
            if base is not None and members.get((group_key, col.key)) and members.get(base[:2]):
                cell, against = members[group_key, col.key], members[base[:2]]
                pairs.append((group_key, col.key, metric_of[col.key], cell, against, base[2]))
    tested = uncertainty.compare_cells(pairs, source, settings)
    by_cell = {(t.row, t.column): t for t in tested}
    intervals = without = 0
    for group_key, row in zip(groups, out, strict=True):
        for col in stat_cols:
            agg = row.get(col.key)
            if not isinstance(agg, Agg):
                continue
            interval = uncertainty.cell_interval(members[group_key, col.key], metric_of[col.key], source, settings)
            intervals, without = intervals + (interval is not None), without + (interval is None)
            row[col.key] = uncertainty.with_stats(agg, interval, by_cell.get((group_key, col.key)))
    if settings.replicates <= 0:
        return [], ["No intervals or comparisons: --bootstrap 0."]
    return tested, uncertainty.notes(
        settings, intervals, without if intervals or tested else 0, tested, source.problems
    )


def _baseline_cell(
    spec: AggSpec,
    group_key: tuple,
    col_key: str,
    key_names: list[str],
    baseline: uncertainty.Baseline,
    groups: set[tuple],
    lookup: dict[str, Any],
) -> tuple[tuple, str, str] | None:
    """(group, column, label) of the cell a cell is compared with, or None: in a pivot over the baseline's key, the
    baseline's column of the same row; elsewhere the row whose keys equal this row's except the baseline's, which
    take the baseline's values (the same column). A cell is never its own baseline."""
    wanted = dict(baseline.values)
    if spec.across is not None:
        if spec.across not in wanted:
            return None
        base_col = next((key for key in lookup if key_norm(key) == key_norm(wanted[spec.across])), None)
        if base_col is None or base_col == col_key:
            return None
        return group_key, base_col, f"{spec.across} {wanted[spec.across]}"
    if not set(wanted) <= set(key_names):
        return None
    target = tuple(wanted[name] if name in wanted else value for name, value in zip(key_names, group_key, strict=True))
    match = next((g for g in groups if all(key_norm(a) == key_norm(b) for a, b in zip(g, target, strict=True))), None)
    if match is None or match == group_key:
        return None
    return match, col_key, baseline.label()


def has_values(table: Table) -> bool:
    return any(isinstance(row.get(col.key), Agg) for row in table.rows for col in table.spec.columns)


def split_runs(spec: AggSpec, loaded: LoadResult) -> list[tuple[AggSpec, LoadResult]]:
    """The (spec, runs) of each table an AggSpec makes: itself over every run, or with ``split`` one per distinct
    value of the split keys (sorted), named <name>_<values> and titled with them."""
    if not spec.split:
        return [(spec, loaded)]

    def part_of(record: RunRecord) -> tuple:
        row = record_to_row(record)
        return tuple(row[k] for k in spec.split)

    parts: dict[tuple, list[RunRecord]] = defaultdict(list)
    for record in loaded.records:
        parts[part_of(record)].append(record)
    out = []
    used: set[str] = set()
    for values in sorted(parts, key=lambda k: tuple(sort_value(v) for v in k)):
        base = slug = "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", fmt_text(v) or "none") for v in values)
        # names that differ only in characters a file name leaves out ('tiny llama', 'tiny-llama') get a number,
        # so that one table never overwrites the other
        number = 1
        while slug in used:
            number += 1
            slug = f"{base}-{number}"
        used.add(slug)
        where = ", ".join(f"{k} {fmt_text(v)}" for k, v in zip(spec.split, values, strict=True))
        out.append(
            (
                replace(spec, name=f"{spec.name}_{slug}", title=f"{spec.title}: {where}"),
                LoadResult(
                    records=parts[values],
                    unreadable=loaded.unreadable,
                    # a run found twice is said in the table its kept record is in, and in any its other copies
                    # would have gone to (a copy whose config differs)
                    duplicates=[d for d in loaded.duplicates if values in {part_of(r) for r in (d.kept, *d.dropped)}],
                ),
            )
        )
    return out
