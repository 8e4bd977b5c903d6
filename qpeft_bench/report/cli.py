"""``qpeft-bench-report [RESULTS_DIR] [--out DIR] [--table NAME]``: which tables (and figures) to build from the run
records, and where to write them."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from qpeft_bench.config import ConfigError
from qpeft_bench.report.aggregate import DEFAULT_DIVERGED_PPL, build_aggregate, has_values, split_runs
from qpeft_bench.report.catalog import AGGREGATES, TABLES
from qpeft_bench.report.figures import PARETO_X, MissingDependency, figure_files
from qpeft_bench.report.formatting import printable
from qpeft_bench.report.output import OutputError, write_files
from qpeft_bench.report.published import Published, load_published
from qpeft_bench.report.published_table import build_published
from qpeft_bench.report.records import LoadResult, load_records
from qpeft_bench.report.reference import Reference, load_reference
from qpeft_bench.report.render import render_markdown, table_files
from qpeft_bench.report.significance import significance_table
from qpeft_bench.report.stats import DEFAULT_REPLICATES
from qpeft_bench.report.tables import Table, build_table, unreadable_notes
from qpeft_bench.report.uncertainty import Baseline, Settings, add_run_intervals


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qpeft-bench-report", description="Summarise run records (result.json) as tables (and figures)."
    )
    parser.add_argument("results_dir", nargs="?", default="runs", help="searched recursively (default: runs)")
    parser.add_argument("--out", default="results/tables", help="output directory (default: results/tables)")
    parser.add_argument(
        "--table",
        choices=[*TABLES, *AGGREGATES, "significance", "published", "all"],
        default="all",
        help="table to build (default: all: every table that has values; by_layer_group only when "
        "some run sets layer groups)",
    )
    parser.add_argument(
        "--diverged-ppl",
        type=float,
        default=DEFAULT_DIVERGED_PPL,
        metavar="PPL",
        help="a run whose perplexity after fine-tuning exceeds this counts as diverged: marked '*' "
        f"and left out of quality means (default: {DEFAULT_DIVERGED_PPL:g})",
    )
    parser.add_argument(
        "--reference",
        metavar="published|FILE",
        help="published values: 'published' (the four studies' tables, shipped) or a CSV with its tidy header "
        "(source, table, ..., setting, metric, value, unit, notes) writes a 'published' table of published value, "
        "ours, difference and interval; a wide CSV adds a ref and a difference column to the tables whose key and "
        "metric columns it names (see report.Reference)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_REPLICATES,
        metavar="N",
        help="bootstrap replicates of the quality cells' intervals and the paired comparisons, from the runs' "
        f"per-item results (default: {DEFAULT_REPLICATES}; 0: no intervals or comparisons)",
    )
    parser.add_argument(
        "--baseline",
        default=Baseline().label(),
        metavar="KEY=VALUE[,...]",
        help="what each quality cell is compared with: the row equal in every key but these, which take these "
        "values (default: layer_group=uniform, the uniform setting of the same model, data, quantizer, method and "
        "ranks; e.g. method_name=lora or r=64,alpha=16)",
    )
    parser.add_argument(
        "--figures",
        action="store_true",
        help="also write figures (PNG, PDF and each one's data as CSV) to the 'figures' folder "
        "beside --out (results/figures by default); needs matplotlib",
    )
    parser.add_argument(
        "--pareto-x",
        choices=list(PARETO_X),
        default="memory",
        help="x axis of the Pareto figure: mean training memory (GiB), bits per weight, or trainable parameters "
        "(log scale) (default: memory)",
    )
    args = parser.parse_args(argv)
    if args.table == "published" and not args.reference:
        parser.error("--table published needs --reference (published, or a tidy CSV)")
    if not args.diverged_ppl > 0:
        parser.error(f"--diverged-ppl must be a positive number, got {args.diverged_ppl}")
    if args.bootstrap != 0 and not 100 <= args.bootstrap <= 100_000:
        # fewer replicates cannot place a 95% interval's ends; more only cost time (minutes per cell)
        parser.error(f"--bootstrap must be 0 (off) or 100 .. 100000 replicates, got {args.bootstrap}")
    try:
        args.baseline = Baseline.parse(args.baseline)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def select_tables(
    loaded: LoadResult,
    name: str,
    diverged_ppl: float = DEFAULT_DIVERGED_PPL,
    reference: Reference | None = None,
    settings: Settings | None = None,
    published: Published | None = None,
) -> list[Table]:
    """The tables --table NAME asks for. 'all' leaves out aggregated tables without any value, and pivots whose only
    column is their baseline (by_layer_group over runs that all use uniform knobs compares nothing); it ends with
    the significance table when any table compared cells with their baselines. A tidy reference (published) makes
    its own table; a wide one adds columns to the aggregated tables."""
    settings = settings or Settings()
    tables = [
        add_run_intervals(build_table(spec, loaded), settings) for key, spec in TABLES.items() if name in (key, "all")
    ]
    wide = reference if reference is not None and not reference.tidy else None
    for key, spec in AGGREGATES.items():
        if name not in (key, "all", "significance"):
            continue
        for part_spec, part in split_runs(spec, loaded):
            table = build_aggregate(part_spec, part, diverged_ppl, wide, settings)
            pivot_cols = [col.key for col in table.spec.columns[len(spec.keys) :]]
            baseline_only = spec.across is not None and set(pivot_cols) <= set(spec.across_first)
            if name == key or (name != "significance" and has_values(table) and not baseline_only):
                tables.append(table)
            elif name == "significance":
                tables.append(table)  # only for its comparisons, dropped below
    tested = significance_table(tables) if name in ("all", "significance") else None
    if name == "significance":
        tables = []
    if published is not None and name in ("published", "all"):
        tables.append(build_published(loaded, published, diverged_ppl, settings))
    return tables + ([tested] if tested is not None else [])


def say(text: str, stream: TextIO) -> None:
    """Write text to stdout or stderr whatever their encoding: what it cannot encode (a non-UTF-8 path, '±' on an
    ASCII terminal) is escaped instead of failing the report."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    stream.write(printable(text).encode(encoding, "backslashreplace").decode(encoding))


def error(message: str) -> int:
    say(f"qpeft-bench-report: error: {message}\n", sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # An empty argument is an unset variable ("--out $OUT"): it must not mean the current directory.
    for name, value in (("results directory", args.results_dir), ("--out", args.out)):
        if not value.strip():
            return error(f"{name} is empty (an unset variable?)")
    root = Path(args.results_dir)
    if not root.is_dir():
        if root.is_symlink():  # a link to scratch that is not mounted, or a loop
            problem = f"is a link to {os.readlink(root)}, which is not a directory"
        else:
            problem = "is not a directory" if root.exists() else "does not exist"
        return error(f"results directory {str(root)!r} {problem}")
    try:
        reference = load_reference(args.reference) if args.reference else None
        published = load_published(reference) if reference is not None and reference.tidy else None
    except ConfigError as exc:
        return error(str(exc))

    loaded = load_records(root)
    if not loaded.records and not loaded.unreadable:
        say(f"no run records under {root}\n", sys.stdout)
        return 0
    if not loaded.records:
        # Every record is corrupt: nothing to tabulate, and a sweep that produced only garbage is an error.
        for note in unreadable_notes(loaded.unreadable):
            say(note + "\n", sys.stderr)
        return error(f"no readable run records under {root}")

    # Everything is rendered before anything is written, and written all or nothing: a report that fails (an
    # unwritable --out, matplotlib missing) leaves the previous tables as they were, never half of a new set.
    settings = Settings(replicates=args.bootstrap, baseline=args.baseline)
    tables = select_tables(loaded, args.table, args.diverged_ppl, reference, settings, published)
    out = Path(args.out)
    files = [table_files(table, out) for table in tables]
    if args.figures:
        try:
            files.append(figure_files(loaded, figures_dir(out), args.diverged_ppl, args.pareto_x, settings))
        except MissingDependency as exc:
            return error(str(exc))
    merged: dict[Path, str | bytes] = {}
    for path, content in (item for group in files for item in group.items()):
        if path in merged:  # --out .../figures: the by_layer_group table and figure would share one CSV
            return error(f"{path} would be written twice (tables and figures in one folder); choose another --out")
        merged[path] = content
    try:
        write_files(merged)
    except OutputError as exc:
        return error(str(exc))
    for i, table in enumerate(tables):
        say(("\n" if i else "") + render_markdown(table), sys.stdout)
    for group in filter(None, files):
        say(f"wrote {', '.join(str(p) for p in group)}\n", sys.stderr)
    return 0


def figures_dir(tables_dir: Path) -> Path:
    """Figures go beside the tables: results/tables -> results/figures."""
    return tables_dir.parent / "figures"
