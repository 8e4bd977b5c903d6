"""Tables from run records: ``qpeft-bench-report [RESULTS_DIR] [--out DIR] [--table NAME]``.

Pipeline: load records -> flat rows -> table spec (columns: key, header, formatter) -> writers.
A table is a declarative :class:`TableSpec`; adding one means adding a spec to ``TABLES``
(and, if it needs a value not yet pulled out of the record, one entry in ``RECORD_FIELDS``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECORD_FILENAME = "result.json"
SUPPORTED_SCHEMAS = frozenset({"qpeft-bench/run-record/v1"})
KNOWN_STATUSES = ("planned", "running", "completed", "failed", "oom", "diverged")
GIB = 2**30
MIB = 2**20

Row = dict[str, Any]


# --------------------------------------------------------------------------- loading


class RecordError(ValueError):
    """A result.json that cannot be used; the message is the human-readable reason."""


@dataclass(frozen=True)
class RunRecord:
    path: Path
    data: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def status(self) -> str:
        return self.data["status"]


@dataclass(frozen=True)
class Unreadable:
    path: Path
    reason: str


@dataclass
class LoadResult:
    records: list[RunRecord] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)


def find_record_files(root: Path) -> list[Path]:
    """Every result.json below root, in a stable order (os.walk order depends on the filesystem)."""
    found = [
        Path(dirpath) / RECORD_FILENAME for dirpath, _, files in os.walk(root) if RECORD_FILENAME in files
    ]
    return sorted(found)


def parse_record(path: Path) -> RunRecord:
    """Read and validate one record; raises RecordError with the reason instead of crashing."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"cannot read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise RecordError("invalid JSON: nested too deeply") from exc
    return validate_record(path, data)


def validate_record(path: Path, data: Any) -> RunRecord:
    """Check only what every table relies on; other sections are optional by design (planned/failed runs)."""
    if not isinstance(data, dict):
        raise RecordError(f"not a JSON object but {type(data).__name__}")
    missing = [key for key in ("schema", "run_id", "status") if key not in data]
    if missing:
        raise RecordError(f"missing {', '.join(missing)}")
    if data["schema"] not in SUPPORTED_SCHEMAS:
        raise RecordError(f"unsupported schema {data['schema']!r}")
    for key in ("run_id", "status"):
        if not isinstance(data[key], str) or not data[key]:
            raise RecordError(f"{key} is not a non-empty string")
    return RunRecord(path=path, data=data)


def load_records(root: str | os.PathLike[str]) -> LoadResult:
    """Load every result.json under root; bad files go to ``unreadable`` rather than raising."""
    result = LoadResult()
    for path in find_record_files(Path(root)):
        try:
            result.records.append(parse_record(path))
        except RecordError as exc:
            result.unreadable.append(Unreadable(path=path, reason=str(exc)))
    return result


# --------------------------------------------------------------------------- flat rows

# Flat row key -> path into the record. Keys carry their unit (…_bytes, s_per_step, …_pct) because
# they double as CSV headers, where numbers stay raw. Tables pick columns from these keys.
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "run_id": ("run_id",),
    "status": ("status",),
    "mode": ("config", "mode"),
    "seed": ("config", "seed"),
    "model": ("config", "model", "name"),
    "quant": ("config", "quant", "name"),
    "double_quant": ("config", "quant", "double_quant"),
    "method": ("config", "peft", "method"),
    "peft_name": ("config", "peft", "name"),
    "variant": ("config", "peft", "variant"),
    "by_layer": ("config", "peft", "by_layer"),
    "r": ("config", "peft", "r"),
    "alpha": ("config", "peft", "alpha"),
    "dropout": ("config", "peft", "dropout"),
    "dataset": ("config", "data", "name"),
    "max_steps": ("config", "train", "max_steps"),
    "batch_size": ("config", "train", "batch_size"),
    "total_params": ("accounting", "total_params"),
    "trainable_params": ("accounting", "trainable_params"),
    "trainable_pct": ("accounting", "trainable_pct"),
    "base_model_bytes": ("accounting", "base_model_bytes"),
    "quantized_model_bytes": ("accounting", "quantized_model_bytes"),
    "param_buffer_bytes": ("accounting", "param_buffer_bytes"),
    "adapter_bytes": ("accounting", "adapter_bytes"),
    "peft_overhead_bytes": ("accounting", "peft_overhead_bytes"),
    "bits_per_weight": ("accounting", "bits_per_weight"),
    "steps": ("train", "steps"),
    "s_per_step": ("train", "s_per_step"),
    "tokens_per_s": ("train", "tokens_per_s"),
    "peak_memory_bytes": ("train", "peak_memory_bytes"),
    "mean_memory_bytes": ("train", "mean_memory_bytes"),
    "memory_kind": ("train", "memory_kind"),
    "final_loss": ("train", "final_loss"),
    "ppl_before": ("eval", "before", "ppl_heldout"),
    "ppl_after": ("eval", "after", "ppl_heldout"),
    "wikitext_ppl_before": ("eval", "before", "ppl_wikitext", "ppl"),
    "wikitext_ppl_after": ("eval", "after", "ppl_wikitext", "ppl"),
    "mmlu_before": ("eval", "before", "mmlu", "average"),
    "mmlu_after": ("eval", "after", "mmlu", "average"),
    "commonsense_before": ("eval", "before", "commonsense", "average"),
    "commonsense_after": ("eval", "after", "commonsense", "average"),
    "leaderboard_avg6_after": ("eval", "after", "leaderboard", "average"),
    "leaderboard_avg4_after": ("eval", "after", "leaderboard", "average_4"),
    "gen_tokens_per_s": ("eval", "after", "speed", "generation", "tokens_per_s"),
    "forward_ms": ("eval", "after", "speed", "step", "forward_ms"),
    "backward_ms": ("eval", "after", "speed", "step", "backward_ms"),
    "start_time": ("meta", "start_time"),
    "end_time": ("meta", "end_time"),
    "error_type": ("error", "type"),
    "error_message": ("error", "message"),
}


def get_path(data: Any, path: Sequence[str]) -> Any:
    """Nested lookup that yields None for any missing or wrongly-typed section."""
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def record_to_row(record: RunRecord) -> Row:
    """One flat row per record: every RECORD_FIELDS key (None when absent) plus record_path."""
    row: Row = {key: get_path(record.data, path) for key, path in RECORD_FIELDS.items()}
    row["record_path"] = str(record.path)
    # A config without a peft section means "base model, no adapter"; without any config we know nothing.
    if row["method"] is None and isinstance(record.data.get("config"), dict):
        row["method"] = "none"
    if row["trainable_pct"] is None:
        row["trainable_pct"] = _percent(row["trainable_params"], row["total_params"])
    return row


def records_to_rows(records: Iterable[RunRecord]) -> list[Row]:
    return [record_to_row(record) for record in records]


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but True is not a count.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _percent(part: Any, whole: Any) -> float | None:
    if _is_number(part) and _is_number(whole) and whole:
        return 100.0 * part / whole
    return None


def sort_value(value: Any) -> tuple[int, float, str]:
    """Total order over mixed cell values: numbers, then strings, then missing (None sorts last)."""
    if _is_number(value) and not math.isnan(value):
        return (0, float(value), "")
    if value is None:
        return (2, 0.0, "")
    return (1, 0.0, str(value))


def sort_rows(rows: Iterable[Row], keys: Sequence[str]) -> list[Row]:
    # record_path last so that duplicated run_ids still come out in a stable order.
    return sorted(rows, key=lambda row: [sort_value(row.get(k)) for k in (*keys, "record_path")])


# --------------------------------------------------------------------------- formatters

Formatter = Callable[[Any], str]


def _numeric(fmt: Callable[[float], str]) -> Formatter:
    """Wrap a number formatter: None -> empty cell, non-numbers shown verbatim rather than crashing."""

    def format_value(value: Any) -> str:
        if value is None:
            return ""
        if not _is_number(value):
            return str(value)
        return fmt(value)

    return format_value


def fmt_text(value: Any) -> str:
    return "" if value is None else str(value)


@_numeric
def fmt_count(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}"


def fmt_fixed(decimals: int) -> Formatter:
    return _numeric(lambda value: f"{value:,.{decimals}f}")


def fmt_scaled(divisor: int, decimals: int) -> Formatter:
    """Bytes -> GiB/MiB; the divisor is binary (2^30 / 2^20), as the table notes say."""
    return _numeric(lambda value: f"{value / divisor:,.{decimals}f}")


def raw_value(value: Any) -> str:
    """CSV cell: the unformatted value, so that float(cell) / int(cell) gives back the record's number."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


# --------------------------------------------------------------------------- table specs


@dataclass(frozen=True)
class Column:
    key: str  # row key; also the CSV header, so it carries the raw unit (…_bytes)
    header: str  # Markdown header, with the display unit
    fmt: Formatter = fmt_text
    align: str = "left"  # "left" | "right"


@dataclass(frozen=True)
class TableSpec:
    name: str  # output file stem and --table choice
    title: str
    columns: tuple[Column, ...]
    sort_by: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    csv_extra: tuple[str, ...] = ("record_path",)  # raw-only keys, e.g. to tell duplicated run_ids apart


def _num(key: str, header: str, fmt: Formatter) -> Column:
    return Column(key, header, fmt, align="right")


OVERVIEW = TableSpec(
    name="overview",
    title="Run overview",
    columns=(
        Column("run_id", "run_id"),
        Column("status", "status"),
        Column("model", "model"),
        Column("quant", "quant"),
        Column("method", "method"),
        _num("r", "r", fmt_count),
        _num("alpha", "alpha", fmt_count),
        _num("trainable_params", "trainable params", fmt_count),
        _num("trainable_pct", "trainable %", fmt_fixed(4)),
        _num("quantized_model_bytes", "quantized size (GiB)", fmt_scaled(GIB, 3)),
        _num("param_buffer_bytes", "param+buffer size (GiB)", fmt_scaled(GIB, 3)),
        _num("peft_overhead_bytes", "PEFT overhead (MiB)", fmt_scaled(MIB, 2)),
        _num("peak_memory_bytes", "peak memory (GiB)", fmt_scaled(GIB, 3)),
        _num("s_per_step", "s/step", fmt_fixed(3)),
        _num("ppl_before", "ppl before", fmt_fixed(3)),
        _num("ppl_after", "ppl after", fmt_fixed(3)),
    ),
    sort_by=("model", "quant", "method", "r", "alpha", "run_id"),
    notes=(
        "Units: GiB = 2^30 bytes, MiB = 2^20 bytes. ppl = held-out perplexity before/after training. "
        "Empty cells: value not recorded (e.g. planned or failed runs).",
    ),
)

EVALUATION = TableSpec(
    name="evaluation",
    title="Evaluation before and after fine-tuning",
    columns=(
        Column("run_id", "run_id"),
        Column("status", "status"),
        Column("model", "model"),
        Column("quant", "quant"),
        Column("peft_name", "method"),
        _num("r", "r", fmt_count),
        _num("ppl_before", "held-out ppl before", fmt_fixed(3)),
        _num("ppl_after", "held-out ppl after", fmt_fixed(3)),
        _num("wikitext_ppl_before", "WikiText ppl before", fmt_fixed(3)),
        _num("wikitext_ppl_after", "WikiText ppl after", fmt_fixed(3)),
        _num("mmlu_before", "MMLU before", fmt_fixed(4)),
        _num("mmlu_after", "MMLU after", fmt_fixed(4)),
        _num("commonsense_before", "commonsense before", fmt_fixed(4)),
        _num("commonsense_after", "commonsense after", fmt_fixed(4)),
        _num("leaderboard_avg6_after", "leaderboard 6-task", fmt_fixed(4)),
        _num("leaderboard_avg4_after", "leaderboard 4-task", fmt_fixed(4)),
        _num("gen_tokens_per_s", "gen tokens/s", fmt_fixed(1)),
        _num("forward_ms", "fwd ms", fmt_fixed(1)),
        _num("backward_ms", "bwd ms", fmt_fixed(1)),
    ),
    sort_by=("model", "quant", "peft_name", "r", "run_id"),
    notes=(
        "held-out ppl: exp(mean token NLL) over the validation split of the fine-tuning data. WikiText ppl: windowed "
        "token perplexity (non-overlapping windows of the joined test split), not lm-eval's word perplexity. MMLU: "
        "lm-eval 5-shot, unweighted mean of the 57 subjects. commonsense: lm-eval 0-shot average of 7 tasks. "
        "leaderboard: Open LLM Leaderboard v1 shots, 6-task and 4-task averages. Speed (after): greedy tokens/s at "
        "batch 1, forward/backward ms of one training step. Each record's eval.protocols names its protocols.",
    ),
)

TABLES: dict[str, TableSpec] = {spec.name: spec for spec in (OVERVIEW, EVALUATION)}
PIVOTS = ("by_layer_group",)  # tables whose columns come from the data (built by their own function)


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    spec: TableSpec
    rows: list[Row]
    notes: list[str]


def build_table(spec: TableSpec, loaded: LoadResult) -> Table:
    rows = sort_rows(records_to_rows(loaded.records), spec.sort_by)
    notes = [*spec.notes, *data_notes(spec, rows), *unreadable_notes(loaded.unreadable)]
    return Table(spec=spec, rows=rows, notes=notes)


# The metric a by-layer-group table compares, and how it reads.
LAYER_GROUP_METRICS = {"ppl_after": "held-out perplexity after fine-tuning (lower is better)"}


def layer_group_label(variant: Any, by_layer: Any) -> str:
    """A run's layer-group setting as a column name: its peft.variant edits and any peft.by_layer value it sets
    ('uniform' when neither is set: the same knobs on every module)."""
    parts = [str(v) for v in variant] if isinstance(variant, list) else []
    if isinstance(by_layer, dict):
        parts += [f"{group}.{knob}:{value}" for group, knobs in sorted(by_layer.items()) if isinstance(knobs, dict)
                  for knob, value in sorted(knobs.items()) if value is not None]
    return " ".join(parts) or "uniform"


def by_layer_group_table(loaded: LoadResult, metric: str = "ppl_after") -> Table:
    """Metric vs. layer group (the key-variable study's layout): one row per (model, data, quantizer, method,
    baseline rank), one column per layer-group setting, cells the mean +- sample std over seeds of completed runs."""
    rows = [r for r in records_to_rows(loaded.records) if r["status"] == "completed"]
    skipped = len(loaded.records) - len(rows)
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    labels: list[str] = []
    for row in rows:
        label = layer_group_label(row["variant"], row["by_layer"])
        if label not in labels:
            labels.append(label)
        key = (row["model"], row["dataset"], row["quant"], row["peft_name"] or row["method"], row["r"])
        if _is_number(row.get(metric)):
            cells[key][label].append(float(row[metric]))
    labels.sort(key=lambda x: (x != "uniform", x))  # the baseline first
    columns = (Column("model", "model"), Column("dataset", "data"), Column("quant", "quant"),
               Column("method", "method"), _num("r", "r", fmt_count),
               *(Column(label, label, fmt_text, align="right") for label in labels))
    out = []
    for key in sorted(cells, key=lambda k: tuple(sort_value(v) for v in k)):
        out.append({**dict(zip(("model", "dataset", "quant", "method", "r"), key, strict=True)),
                    **{label: mean_std(cells[key].get(label, [])) for label in labels}})
    spec = TableSpec(name="by_layer_group", title=f"{metric} by layer group", columns=columns, csv_extra=())
    notes = [f"{metric}: {LAYER_GROUP_METRICS.get(metric, metric)}. Cells: mean ± sample std over seeds (n runs); "
             "completed runs only. Columns: the layer-group setting (peft.variant edits and peft.by_layer values; "
             "'uniform' = the same knobs on every module)."]
    if skipped:
        notes.append(f"{skipped} record(s) not completed (planned, running, failed, oom or diverged) left out")
    return Table(spec=spec, rows=out, notes=[*notes, *unreadable_notes(loaded.unreadable)])


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f} (1)"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.3f} ± {std:.3f} ({len(values)})"


def data_notes(spec: TableSpec, rows: Sequence[Row]) -> list[str]:
    notes = duplicate_notes(rows)
    if any(col.key == "peak_memory_bytes" for col in spec.columns):
        notes += memory_kind_notes(rows)
    return notes


def duplicate_notes(rows: Sequence[Row]) -> list[str]:
    # A copied run directory yields the same run_id twice; both rows stay so nothing is silently hidden.
    paths: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        paths[row["run_id"]].append(row["record_path"])
    return [
        f"duplicate run_id {run_id}: {', '.join(sorted(found))} (all rows kept)"
        for run_id, found in sorted(paths.items())
        if len(found) > 1
    ]


def memory_kind_notes(rows: Sequence[Row]) -> list[str]:
    # CPU peak RSS and CUDA allocator peaks are not comparable; flag it when a table mixes them.
    kinds = Counter(str(row.get("memory_kind")) for row in rows if row.get("peak_memory_bytes") is not None)
    if len(kinds) < 2:
        return []
    listed = ", ".join(f"{kind} ({count})" for kind, count in sorted(kinds.items()))
    return [f"peak memory mixes measurement kinds, compare only within one: {listed}"]


def unreadable_notes(unreadable: Iterable[Unreadable]) -> list[str]:
    return [f"unreadable: {item.path} ({item.reason})" for item in unreadable]


# --------------------------------------------------------------------------- writers


def _md_cell(text: str) -> str:
    # A bare '|' or newline in a value (model path, error message) would break the table layout.
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_line(cells: Sequence[str], widths: Sequence[int], columns: Sequence[Column]) -> str:
    padded = [
        c.rjust(w) if col.align == "right" else c.ljust(w)
        for c, w, col in zip(cells, widths, columns, strict=True)
    ]
    return "| " + " | ".join(padded) + " |"


def render_markdown(table: Table) -> str:
    """Padded GitHub-flavoured Markdown, so it is readable both rendered and on a terminal."""
    columns = table.spec.columns
    headers = [_md_cell(col.header) for col in columns]
    body = [[_md_cell(col.fmt(row.get(col.key))) for col in columns] for row in table.rows]
    widths = [max(3, len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    rule = [
        "-" * (w - 1) + ":" if col.align == "right" else "-" * w
        for w, col in zip(widths, columns, strict=True)
    ]
    lines = [f"## {table.spec.title}", "", _md_line(headers, widths, columns)]
    lines.append("| " + " | ".join(rule) + " |")
    lines += [_md_line(cells, widths, columns) for cells in body]
    if table.notes:
        lines += ["", *(f"- {_md_cell(note)}" for note in table.notes)]
    return "\n".join(lines) + "\n"


def csv_fields(spec: TableSpec) -> list[str]:
    return [col.key for col in spec.columns] + [
        k for k in spec.csv_extra if k not in {c.key for c in spec.columns}
    ]


def render_csv(table: Table) -> str:
    """Raw values under unit-suffixed keys; unreadable records are skipped (they have no row)."""
    buffer = io.StringIO()
    fields = csv_fields(table.spec)
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    writer.writerows([raw_value(row.get(key)) for key in fields] for row in table.rows)
    return buffer.getvalue()


WRITERS: dict[str, Callable[[Table], str]] = {"md": render_markdown, "csv": render_csv}


def write_table(table: Table, out_dir: Path) -> list[Path]:
    """Write one file per writer (``<name>.md``, ``<name>.csv``); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, render in WRITERS.items():
        path = out_dir / f"{table.spec.name}.{suffix}"
        path.write_text(render(table), encoding="utf-8", newline="")
        written.append(path)
    return written


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qpeft-bench-report", description="Summarise run records (result.json) as tables."
    )
    parser.add_argument("results_dir", nargs="?", default="runs", help="searched recursively (default: runs)")
    parser.add_argument("--out", default="results/tables", help="output directory (default: results/tables)")
    parser.add_argument("--table", choices=[*sorted(TABLES), *PIVOTS, "all"], default="all",
                        help="table to build (default: all; by_layer_group only when some run sets layer groups)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.results_dir)
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        print(f"qpeft-bench-report: error: results directory {str(root)!r} {problem}", file=sys.stderr)
        return 1

    loaded = load_records(root)
    if not loaded.records and not loaded.unreadable:
        print(f"no run records under {root}")
        return 0
    if not loaded.records:
        # Every record is corrupt: nothing to tabulate, and a sweep that produced only garbage is an error.
        for note in unreadable_notes(loaded.unreadable):
            print(note, file=sys.stderr)
        print(f"qpeft-bench-report: error: no readable run records under {root}", file=sys.stderr)
        return 1

    tables = [build_table(TABLES[name], loaded) for name in TABLES if args.table in (name, "all")]
    grouped = any(layer_group_label(r["variant"], r["by_layer"]) != "uniform" for r in records_to_rows(loaded.records))
    if args.table == "by_layer_group" or (args.table == "all" and grouped):
        tables.append(by_layer_group_table(loaded))
    for i, table in enumerate(tables):
        written = write_table(table, Path(args.out))
        sys.stdout.write(("\n" if i else "") + render_markdown(table))
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
