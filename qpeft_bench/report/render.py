"""Writers: a Table as padded Markdown, as CSV of raw values, or as a booktabs LaTeX table; table_files names the
three files of a table (cli writes them with output.write_files). Every writer's text is printable
(formatting.printable): a path or record string that is not valid UTF-8 shows as an escape instead of failing."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qpeft_bench.report.formatting import printable, raw_value
from qpeft_bench.report.rows import INTERVALS, MARKS, Row
from qpeft_bench.report.tables import Agg, Column, Table, TableSpec, cell_text


def _md_cell(text: str) -> str:
    # A bare '|' or newline in a value (model path, error message) would break the table layout.
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_line(cells: Sequence[str], widths: Sequence[int], columns: Sequence[Column]) -> str:
    padded = [
        c.rjust(w) if col.align == "right" else c.ljust(w) for c, w, col in zip(cells, widths, columns, strict=True)
    ]
    return "| " + " | ".join(padded) + " |"


def render_markdown(table: Table) -> str:
    """Padded GitHub-flavoured Markdown, so it is readable both rendered and on a terminal."""
    columns = table.spec.columns
    headers = [_md_cell(col.header) for col in columns]
    body = [[_md_cell(cell_text(col, row)) for col in columns] for row in table.rows]
    widths = [max(3, len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    rule = ["-" * (w - 1) + ":" if col.align == "right" else "-" * w for w, col in zip(widths, columns, strict=True)]
    lines = [f"## {table.spec.title}", "", _md_line(headers, widths, columns)]
    lines.append("| " + " | ".join(rule) + " |")
    lines += [_md_line(cells, widths, columns) for cells in body]
    if table.notes:
        lines += ["", *(f"- {_md_cell(note)}" for note in table.notes)]
    return printable("\n".join(lines) + "\n")


# The CSV columns of an averaged cell: always mean, std, n; its interval and its comparison only in a table where some
# cell has one (tables without per-item results keep their columns).
AGG_FIELDS = ("mean", "std", "n")
INTERVAL_FIELDS = ("low", "high")
COMPARISON_FIELDS = ("diff", "diff_low", "diff_high", "p", "p_holm")


def _agg_fields(table: Table) -> tuple[str, ...]:
    cells = [row.get(col.key) for row in table.rows for col in table.spec.columns if col.agg]
    aggs = [c for c in cells if isinstance(c, Agg)]
    return (
        AGG_FIELDS
        + (INTERVAL_FIELDS if any(a.interval for a in aggs) else ())
        + (COMPARISON_FIELDS if any(a.comparison for a in aggs) else ())
    )


def _run_interval_keys(table: Table) -> set[str]:
    """Per-run columns where some row has its own interval: they get <key>_low and <key>_high."""
    return {key for row in table.rows for key in (row.get(INTERVALS) or {})}


def csv_fields(spec: TableSpec, agg_fields: Sequence[str] = AGG_FIELDS, intervals: set[str] = frozenset()) -> list[str]:
    fields = []
    for col in spec.columns:
        if col.agg:
            fields += [f"{col.key}_{f}" for f in agg_fields]
        else:
            fields += [col.key, f"{col.key}_low", f"{col.key}_high"] if col.key in intervals else [col.key]
    return fields + [k for k in spec.csv_extra if k not in {c.key for c in spec.columns}]


def _agg_cells(agg: Any) -> dict[str, Any]:
    if not isinstance(agg, Agg):
        return {"n": 0}
    cells = {"mean": agg.mean, "std": agg.std, "n": agg.n}
    if agg.interval is not None:
        cells.update(low=agg.interval.low, high=agg.interval.high)
    c = agg.comparison
    if c is not None:
        cells.update(diff=c.diff, diff_low=c.low, diff_high=c.high, p=c.p, p_holm=c.p_holm)
    return cells


def csv_row(
    spec: TableSpec, row: Row, agg_fields: Sequence[str] = AGG_FIELDS, intervals: set[str] = frozenset()
) -> list[str]:
    cells: Row = dict(row)
    for col in spec.columns:
        if col.agg:
            cells.update({f"{col.key}_{k}": v for k, v in _agg_cells(row.get(col.key)).items()})
    for key, interval in (row.get(INTERVALS) or {}).items():
        cells.update({f"{key}_low": interval.low, f"{key}_high": interval.high})
    return [raw_value(cells.get(key)) for key in csv_fields(spec, agg_fields, intervals)]


def render_csv(table: Table) -> str:
    """Raw values under unit-suffixed keys (an aggregated cell as mean, std, n); unreadable records are skipped. A
    table with marked cells gets a last column `not_full`: {key: why} of the row's marked cells (JSON)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = {col.key for col in table.spec.columns}
    marks = [{k: v for k, v in (row.get(MARKS) or {}).items() if k in keys} for row in table.rows]
    extra = [MARKS] if any(marks) else []
    fields, intervals = _agg_fields(table), _run_interval_keys(table)
    writer.writerow(csv_fields(table.spec, fields, intervals) + extra)
    writer.writerows(
        csv_row(table.spec, row, fields, intervals) + ([raw_value(m or None)] if extra else [])
        for row, m in zip(table.rows, marks, strict=True)
    )
    return printable(buffer.getvalue())


LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "|": r"\textbar{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "×": r"$\times$",
    "†": r"$^\dagger$",
    "‡": r"$^\ddagger$",
    "\n": " ",
    "\r": " ",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(char, char) for char in text)


def render_latex(table: Table) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); numbers right-aligned; notes in small print below."""
    columns = table.spec.columns
    align = "".join("r" if col.align == "right" else "l" for col in columns)
    lines = [
        "% generated by qpeft-bench-report; needs \\usepackage{booktabs}",
        "\\begin{table}[htbp]",
        "\\centering",
        f"\\caption{{{latex_escape(table.spec.title)}}}",
        f"\\label{{tab:{table.spec.name}}}",
        f"\\begin{{tabular}}{{{align}}}",
        "\\toprule",
        " & ".join(latex_escape(col.header) for col in columns) + " \\\\",
        "\\midrule",
        *(" & ".join(latex_escape(cell_text(col, row)) for col in columns) + " \\\\" for row in table.rows),
        "\\bottomrule",
        "\\end{tabular}",
    ]
    if table.notes:
        lines += ["\\par\\smallskip", "{\\footnotesize", *(f"{latex_escape(note)}\\par" for note in table.notes), "}"]
    lines.append("\\end{table}")
    return printable("\n".join(lines) + "\n")


WRITERS: dict[str, Callable[[Table], str]] = {"md": render_markdown, "csv": render_csv, "tex": render_latex}


def table_files(table: Table, out_dir: Path) -> dict[Path, str]:
    """One file per writer: ``<name>.md``, ``<name>.csv``, ``<name>.tex`` under out_dir, with their text."""
    return {out_dir / f"{table.spec.name}.{suffix}": render(table) for suffix, render in WRITERS.items()}
