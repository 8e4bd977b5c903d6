"""Published values (--reference FILE): reading the file, and a wide CSV matched onto an aggregated table's key
columns, adding a ref and a difference column after every metric it holds. A tidy file (one published cell per row,
the shipped published_quality.csv) is read here, checked in report/published.py
and compared in report/published_table.py."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qpeft_bench import ASSETS
from qpeft_bench.config import ConfigError
from qpeft_bench.report.formatting import GIB, MIB, fmt_fixed
from qpeft_bench.report.rows import percent
from qpeft_bench.report.tables import Agg, Column, Table

# Column names of the published-value CSVs in docs/reference/ (e.g. accounting_llama2_7b.csv), mapped onto our
# metrics. The published overhead carries qlora.py's set-up (fp32 norms, a pad-token row), so it compares with that
# figure, and a published quantized size is transformers' get_memory_footprint(), i.e. parameters + buffers;
# "MB"/"GB" there mean MiB/GiB.
REFERENCE_ALIASES = {
    "overhead_published_MB": "qlora_recipe_overhead_MiB",
    "quantized_size_published_GB": "param_buffer_GiB",
}
REFERENCE_UNITS = {"MiB": MIB, "MB": MIB, "GiB": GIB, "GB": GIB}
# --reference published: the four studies' table cells, shipped in the package (a wheel has no docs/).
PUBLISHED_KEYWORD = "published"
PUBLISHED_FILE = ASSETS / "reference" / "published_quality.csv"
# The columns of a tidy file (one published table cell per row); a file with any of the marker columns is read as
# tidy, so that one missing column is an error instead of a wide CSV that silently matches nothing.
TIDY_COLUMNS = (
    "source", "table", "model", "data", "quant", "bits", "method", "r", "alpha", "setting", "metric", "value", "unit",
    "notes",
)  # fmt: skip
TIDY_MARKERS = frozenset({"setting", "metric", "value", "unit"})


@dataclass(frozen=True)
class Reference:
    """Published values: a CSV whose key columns are named like a table's key columns (by CSV name, e.g.
    method_name, or by header, e.g. method) and whose value columns are named like a metric key (record units) or
    like a byte metric's stem plus a unit (param_buffer_GiB, peft_overhead_MiB), or as in REFERENCE_ALIASES."""

    path: Path
    header: tuple[str, ...]
    rows: tuple[dict[str, str], ...]

    @property
    def tidy(self) -> bool:
        return bool(TIDY_MARKERS & set(self.header))


def load_reference(path: str | os.PathLike[str]) -> Reference:
    """The file --reference names ('published': the shipped published_quality.csv); a tidy file must have every
    TIDY_COLUMNS column (its rows are checked by published.load_published)."""
    if str(path) == PUBLISHED_KEYWORD:  # the keyword wins over a file of that name in the current directory
        path = PUBLISHED_FILE
    try:
        # utf-8-sig: a CSV saved by a spreadsheet starts with a byte-order mark, which would stick to the first
        # column's name and make its key column go unmatched
        with open(path, newline="", encoding="utf-8-sig") as handle:
            # '#' lines are comments, as in the CSVs of docs/reference/.
            reader = csv.DictReader(line for line in handle if not line.startswith("#"))
            rows = tuple(reader)
            header = tuple(reader.fieldnames or ())
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"--reference {path}: cannot read: {exc}") from exc
    if not header:
        raise ConfigError(f"--reference {path}: no header row")
    reference = Reference(path=Path(path), header=header, rows=rows)
    missing = [name for name in TIDY_COLUMNS if name not in header]
    if reference.tidy and missing:
        raise ConfigError(
            f"--reference {path}: a tidy file (one published cell per row) lacks column(s) {', '.join(missing)}"
        )
    return reference


def reference_metric(name: str, metric_keys: Iterable[str]) -> tuple[str, int] | None:
    """(metric key, factor that turns the CSV value into the record's unit) for a reference column, or None."""
    name = REFERENCE_ALIASES.get(name, name)
    keys = set(metric_keys)
    if name in keys:
        return name, 1
    stem, _, unit = name.rpartition("_")
    if unit in REFERENCE_UNITS and f"{stem}_bytes" in keys:
        return f"{stem}_bytes", REFERENCE_UNITS[unit]
    return None


def key_norm(value: Any) -> str:
    """Row keys and CSV cells compare as text with numbers normalised (8, 8.0 and '8' match; None matches '')."""
    if value is None:
        return ""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def add_reference(table: Table, key_names: Sequence[str], reference: Reference) -> Table:
    """Add a 'ref' and a 'Δ' (ours - ref) column after every metric that the reference CSV holds."""
    columns = table.spec.columns
    by_name = {col.key: col.key for col in columns if col.key in key_names}
    by_name.update({col.header: col.key for col in columns if col.key in key_names})
    match_on = [(name, by_name[name]) for name in reference.header if name in by_name]
    metrics = {}
    for name in reference.header:
        found = reference_metric(name, [col.key for col in columns if col.agg])
        if found is not None:
            metrics.setdefault(found[0], (name, found[1]))
    if not metrics:
        return table
    where = f"reference {reference.path}"
    if not match_on:
        return replace(
            table,
            notes=[*table.notes, f"{where}: not applied, no column named like a key column ({', '.join(by_name)})"],
        )
    new_columns: list[Column] = []
    for col in columns:
        new_columns.append(col)
        if col.key in metrics:
            new_columns += [
                Column(f"ref_{col.key}", f"{col.header} ref", col.fmt, align="right"),
                Column(f"diff_{col.key}", "Δ", col.fmt, align="right"),
                Column(f"diff_pct_{col.key}", "Δ %", fmt_fixed(2), align="right"),
            ]
    matched = 0
    rows = []
    for row in table.rows:
        row = dict(row)
        # the '*' of a diverged group is a mark, not part of its key
        wanted = [key_norm(str(row[key]).rstrip("*") if row[key] is not None else None) for _, key in match_on]
        hits = [ref for ref in reference.rows if [key_norm(ref.get(name)) for name, _ in match_on] == wanted]
        if len(hits) == 1:
            matched += 1
            for key, (name, factor) in metrics.items():
                ref_value = _ref_number(hits[0].get(name))
                ours = row.get(key).mean if isinstance(row.get(key), Agg) else None
                row[f"ref_{key}"] = None if ref_value is None else ref_value * factor
                if ours is not None and ref_value is not None:
                    row[f"diff_{key}"] = ours - row[f"ref_{key}"]
                    row[f"diff_pct_{key}"] = percent(row[f"diff_{key}"], row[f"ref_{key}"])
        rows.append(row)
    keys = ", ".join(name for name, _ in match_on)
    cols = ", ".join(f"{name} -> {key}" for key, (name, _) in metrics.items())
    note = (
        f"{where}: published values ({cols}) matched on {keys} for {matched} of {len(rows)} rows; "
        "Δ = ours - ref, Δ % relative to ref."
    )
    spec = replace(table.spec, columns=tuple(new_columns))
    return Table(spec=spec, rows=rows, notes=[*table.notes, note])


def _ref_number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None
