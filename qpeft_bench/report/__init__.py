"""Tables (and figures) from run records: ``qpeft-bench-report [RESULTS_DIR] [--out DIR] [--table NAME]``.

Pipeline, one module per step, each importing only the ones before it:
records (load result.json) -> rows (flat rows) -> formatting (cell text) -> stats (bootstrap intervals, paired
comparisons, Holm) -> tables (TableSpec, Table, Agg) -> uncertainty (per-item results of the runs -> the cells'
intervals and comparisons) -> reference (a wide CSV of published values) -> aggregate (AggSpec, build_aggregate) ->
catalog (TABLES, AGGREGATES: every table, as data) -> significance (every comparison as a table) -> published,
published_table (the studies' published cells matched to ours) -> render (Markdown, CSV, LaTeX) -> output
(all-or-nothing writes) -> figures -> cli (the command). Adding a table means adding a spec to catalog.py (and, if it
needs a value not yet pulled out of the record, one entry in rows.RECORD_FIELDS).
"""

# Re-exported for the callers that use the package as one module (`report.main(...)`, `report.load_records(...)`).
from qpeft_bench.report.cli import main
from qpeft_bench.report.records import load_records, parse_record
from qpeft_bench.report.rows import layer_group_label

__all__ = ["layer_group_label", "load_records", "main", "parse_record"]
