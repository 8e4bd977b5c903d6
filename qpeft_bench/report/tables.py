"""The table model: a declarative TableSpec (columns: key, header, formatter), a built Table (rows and notes), the
Agg cell of an aggregated table, and build_table with the notes every table carries (runs found twice, mixed memory
kinds, unreadable records)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qpeft_bench.report.formatting import Formatter, fmt_text
from qpeft_bench.report.records import Duplicate, LoadResult, Unreadable
from qpeft_bench.report.rows import INTERVALS, MARKS, Row, records_to_rows, sort_rows
from qpeft_bench.report.stats import Comparison, Interval

MARK = "†"  # a value from a limited or fixtures evaluation ("*" marks diverged runs)
SIGNIFICANT = "‡"  # a difference whose interval excludes zero after Holm's correction over the table


@dataclass(frozen=True)
class Column:
    key: str  # row key; also the CSV header, so it carries the raw unit (…_bytes)
    header: str  # Markdown header, with the display unit
    fmt: Formatter = fmt_text
    align: str = "left"  # "left" | "right"
    agg: bool = False  # cells are Agg: the CSV gets <key>_mean, <key>_std, <key>_n


@dataclass(frozen=True)
class TableSpec:
    name: str  # output file stem and --table choice
    title: str
    columns: tuple[Column, ...]
    sort_by: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    csv_extra: tuple[str, ...] = ("record_path",)  # raw-only keys, e.g. to tell duplicated run_ids apart


@dataclass
class Table:
    spec: TableSpec
    rows: list[Row]
    notes: list[str]
    tested: list[Any] = field(default_factory=list)  # uncertainty.Tested: the table's comparisons (significance)


def build_table(spec: TableSpec, loaded: LoadResult) -> Table:
    rows = sort_rows(records_to_rows(loaded.records), spec.sort_by)
    marked = [
        (row["run_id"], col.header, row[MARKS][col.key])
        for row in rows
        for col in spec.columns
        if col.key in row[MARKS] and row.get(col.key) is not None
    ]
    notes = [
        *spec.notes,
        *duplicate_notes(loaded.duplicates),
        *data_notes(spec, rows),
        *coverage_notes(marked),
        *unreadable_notes(loaded.unreadable),
    ]
    return Table(spec=spec, rows=rows, notes=notes)


def cell_text(col: Column, row: Row) -> str:
    """The cell's display text, with MARK when its value came from a limited or fixtures evaluation."""
    text = col.fmt(row.get(col.key))
    interval = (row.get(INTERVALS) or {}).get(col.key)
    if text and interval is not None:
        text += f" [{col.fmt(interval.low)}, {col.fmt(interval.high)}]"
    return f"{text}{MARK}" if text and col.key in (row.get(MARKS) or {}) else text


def coverage_notes(marked: Iterable[tuple[str, str, str]]) -> list[str]:
    """(run id, column header, why) of every marked cell -> the note that says what MARK means, per reason: which
    columns of which runs."""
    runs: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for run_id, header, why in marked:
        runs[why][header].add(str(run_id))
    parts = []
    for why, by_header in sorted(runs.items()):
        same: dict[tuple[str, ...], list[str]] = defaultdict(list)  # columns marked in the same runs, said once
        for header, ids in by_header.items():
            same[tuple(sorted(ids))].append(header)
        cells = "; ".join(f"{', '.join(headers)} of {', '.join(ids)}" for ids, headers in same.items())
        parts.append(f"{why} ({cells})")
    if not parts:
        return []
    return [f"{MARK} not the full benchmark, not comparable with published numbers: " + ". ".join(parts)]


@dataclass(frozen=True)
class Agg:
    """The values of one cell of an aggregated table (one per run that entered it)."""

    values: tuple[float, ...]
    interval: Interval | None = None  # a bootstrap interval of the mean (stats.py), where per-item results exist
    comparison: Comparison | None = None  # against the table's baseline on the same items (stats.py)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def same(self) -> bool:
        return len(set(self.values)) == 1

    @property
    def mean(self) -> float:
        # All equal: the value itself, so an integer count stays an integer in the CSV.
        return self.values[0] if self.same else sum(self.values) / self.n

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1); None for a single value."""
        if self.n < 2:
            return None
        mean = sum(self.values) / self.n
        try:
            return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (self.n - 1))
        except OverflowError:  # values near the float limit (a corrupt record): the spread is unbounded, not a crash
            return math.inf


def fmt_agg(inner: Formatter, *, show_n: bool) -> Formatter:
    """'mean ± std (n)' with the metric's own formatter; show_n=False (values that a configuration fixes, such as
    parameter counts) prints just the value when every run agrees and falls back to mean ± std (n) when not."""

    def format_value(value: Any) -> str:
        if not isinstance(value, Agg):
            return inner(value)
        if not show_n and value.same:
            text = inner(value.mean)
        elif value.n == 1:
            text = f"{inner(value.mean)} (1)"
        else:
            text = f"{inner(value.mean)} ± {inner(value.std)} ({value.n})"
        if value.interval is not None:
            text += f" [{inner(value.interval.low)}, {inner(value.interval.high)}]"
        c = value.comparison
        if c is not None:
            text += f"; Δ {_signed(inner, c.diff)} [{_signed(inner, c.low)}, {_signed(inner, c.high)}]"
            text += SIGNIFICANT if c.significant else ""
        return text

    return format_value


def _signed(inner: Formatter, value: float) -> str:
    """A difference with its sign always shown (the formatter prints the magnitude)."""
    text = inner(abs(value))
    return f"-{text}" if value < 0 and text.strip("0.,") else f"+{text}"


def data_notes(spec: TableSpec, rows: Sequence[Row]) -> list[str]:
    if any(col.key == "peak_memory_bytes" for col in spec.columns):
        return memory_kind_notes(rows)
    return []


def duplicate_notes(duplicates: Iterable[Duplicate]) -> list[str]:
    """One line per run found at several paths (a copied run directory): which record counted, and whether the
    others hold other results (then the copy is not a plain copy, and which one is right is for the reader to say)."""
    notes = []
    for dup in duplicates:
        times = "twice" if len(dup.dropped) == 1 else f"{len(dup.dropped) + 1} times"
        others = ", ".join(str(r.path) for r in dup.dropped)
        differ = f"; the records differ in {', '.join(dup.differ)}" if dup.differ else ""
        notes.append(f"run {dup.kept.run_id} found {times}: {dup.kept.path} (kept), {others}; counted once{differ}")
    return notes


def memory_kind_notes(rows: Sequence[Row]) -> list[str]:
    # CPU peak RSS and CUDA allocator peaks are not comparable; flag it when a table mixes them.
    kinds = Counter(str(row.get("memory_kind")) for row in rows if row.get("peak_memory_bytes") is not None)
    if len(kinds) < 2:
        return []
    listed = ", ".join(f"{kind} ({count})" for kind, count in sorted(kinds.items()))
    return [f"peak memory mixes measurement kinds, compare only within one: {listed}"]


def unreadable_notes(unreadable: Iterable[Unreadable]) -> list[str]:
    return [f"unreadable: {item.path} ({item.reason})" for item in unreadable]
