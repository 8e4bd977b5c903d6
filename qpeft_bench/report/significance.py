"""The `significance` table: every paired comparison that the aggregated tables made (uncertainty.compare_cells), one
row each, with its table, the cell and its baseline, the difference and its interval, the raw and Holm-adjusted
p-values, and whether it counts as significant."""

from __future__ import annotations

from collections.abc import Sequence

from qpeft_bench.report.formatting import fmt_fixed, fmt_text
from qpeft_bench.report.tables import SIGNIFICANT, Column, Table, TableSpec

SPEC = TableSpec(
    name="significance",
    title="Paired comparisons against the baselines",
    columns=(
        Column("table", "table"),
        Column("row", "row"),
        Column("column", "column"),
        Column("baseline", "baseline"),
        Column("runs", "runs (cell/baseline)", align="right"),
        Column("diff", "Δ", fmt_fixed(4), align="right"),
        Column("diff_low", "Δ low", fmt_fixed(4), align="right"),
        Column("diff_high", "Δ high", fmt_fixed(4), align="right"),
        Column("p", "p", fmt_text, align="right"),
        Column("p_holm", "p (Holm)", fmt_text, align="right"),
        Column("verdict", "significant"),
    ),
    csv_extra=(),
)


def p_text(p: float, replicates: int) -> str:
    """A bootstrap p-value: none of the replicates crossed zero says p < 1 / replicates, not p = 0."""
    return f"< {1 / replicates:.2g}" if p == 0 and replicates else f"{p:.4f}"


def significance_table(tables: Sequence[Table]) -> Table | None:
    """The comparisons of `tables`, in table order; None when no table made one."""
    rows = []
    level = None
    for table in tables:
        for t in table.tested:
            c = t.comparison
            level = c.level
            if not t.in_family:
                verdict = "not tested (limited evaluation †)"
            else:
                verdict = "yes" if c.significant else "no"
            rows.append(
                {
                    "table": table.spec.name,
                    "row": " ".join(fmt_text(v) for v in t.row),
                    "column": t.column if t.column == t.metric else f"{t.metric} ({t.column})",
                    "baseline": c.baseline,
                    "runs": f"{t.runs[0]}/{t.runs[1]}",
                    "diff": c.diff,
                    "diff_low": c.low,
                    "diff_high": c.high,
                    "p": p_text(c.p, c.replicates),
                    "p_holm": None if c.p_holm is None else p_text(c.p_holm, c.replicates),
                    "verdict": verdict,
                }
            )
    if not rows:
        return None
    notes = [
        f"Δ = cell - baseline, evaluated on the same items; [Δ low, Δ high]: {level:.0%} paired bootstrap interval "
        "(items resampled once for both sides; runs resampled, paired by seed where both sides have the same seeds). "
        "p: two-sided bootstrap p-value. p (Holm): adjusted over the comparisons of the same table (the family); "
        f"significant: p (Holm) < {1 - level:.2g}, marked {SIGNIFICANT} in that table. Comparisons involving a limited "
        "or fixtures evaluation are listed but not tested.",
    ]
    return Table(spec=SPEC, rows=rows, notes=notes)
