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
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

RECORD_FILENAME = "result.json"
SUPPORTED_SCHEMAS = frozenset({"qpeft-bench/run-record/v1"})
KNOWN_STATUSES = ("planned", "running", "completed", "failed", "oom", "diverged")
GIB = 2**30
MIB = 2**20

Row = dict[str, Any]
# The Open LLM Leaderboard v1 tasks in the order the QEFT comparison table prints them (evaluation/harness.py).
LEADERBOARD_TASKS = ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k")
COMMONSENSE_TASKS = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")


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
    found = [Path(dirpath) / RECORD_FILENAME for dirpath, _, files in os.walk(root) if RECORD_FILENAME in files]
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
    "quant_state_bytes": ("accounting", "quant_state_bytes"),
    "qlora_recipe_overhead_bytes": ("accounting", "qlora_recipe_overhead_bytes"),
    "quant_bits": ("config", "quant", "bits"),
    "quant_nbits": ("config", "quant", "nbits"),
    "quant_group_size": ("config", "quant", "group_size"),
    "steps": ("train", "steps"),
    "s_per_step": ("train", "s_per_step"),
    "tokens_per_s": ("train", "tokens_per_s"),
    "peak_memory_bytes": ("train", "peak_memory_bytes"),
    "mean_memory_bytes": ("train", "mean_memory_bytes"),
    "memory_kind": ("train", "memory_kind"),
    "time_500_steps_s": ("train", "time_500_steps_s"),
    "final_loss": ("train", "final_loss"),
    "losses": ("train", "losses"),
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
    **{f"lb_{task}_after": ("eval", "after", "leaderboard", "tasks", task, "value") for task in LEADERBOARD_TASKS},
    **{f"cs_{task}_after": ("eval", "after", "commonsense", "tasks", task, "value") for task in COMMONSENSE_TASKS},
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


# Fields whose values are lists or mappings by design; any other field holding one is as good as missing (tables group
# rows by these values and format them as numbers or text).
CONTAINER_FIELDS = frozenset({"variant", "by_layer", "losses"})


def record_to_row(record: RunRecord) -> Row:
    """One flat row per record: every RECORD_FIELDS key (None when absent or wrongly typed) plus record_path."""
    row: Row = {}
    for key, path in RECORD_FIELDS.items():
        value = get_path(record.data, path)
        row[key] = None if isinstance(value, (list, dict)) and key not in CONTAINER_FIELDS else value
    row["record_path"] = str(record.path)
    # A config without a peft section means "base model, no adapter"; without any config we know nothing.
    if row["method"] is None and isinstance(record.data.get("config"), dict):
        row["method"] = "none"
    if row["trainable_pct"] is None:
        row["trainable_pct"] = _percent(row["trainable_params"], row["total_params"])
    # Derived keys the aggregated tables group by: the method as configs name it (rslora, dora, ... share the
    # lora module), the quantizer with the settings that change its size, and the layer-group setting.
    row["method_name"] = row["peft_name"] or row["method"]
    row["quant_setting"] = quant_setting(row)
    row["layer_group"] = layer_group_label(row["variant"], row["by_layer"])
    return row


def quant_setting(row: Row) -> str | None:
    """'hqq 2-bit g64', 'nf4 +dq', 'gptq 4-bit g128': the quantizer plus the knobs that change its bytes."""
    if row["quant"] is None:
        return None
    parts = [str(row["quant"])]
    bits = row["quant_bits"] if row["quant_bits"] is not None else row["quant_nbits"]
    if bits is not None:
        parts.append(f"{bits}-bit")
    if row["quant_group_size"] is not None:
        parts.append(f"g{row['quant_group_size']}")
    if row["double_quant"] is True:
        parts.append("+dq")
    return " ".join(parts)


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


def fmt_plain(decimals: int) -> Formatter:
    """Without thousands separators: for cells that scripts parse back (by_layer_group's 'mean ± std (n)')."""
    return _numeric(lambda value: f"{value:.{decimals}f}")


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
    agg: bool = False  # cells are Agg: the CSV gets <key>_mean, <key>_std, <key>_n


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


# --------------------------------------------------------------------------- aggregated tables (thesis layout)

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
        if _is_number(after) and not float(after) <= threshold:
            if not (_is_number(before) and float(after) < float(before)):
                return True
    return False


@dataclass(frozen=True)
class Agg:
    """The values of one cell of an aggregated table (one per run that entered it)."""

    values: tuple[float, ...]

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
            return inner(value.mean)
        if value.n == 1:
            return f"{inner(value.mean)} (1)"
        return f"{inner(value.mean)} ± {inner(value.std)} ({value.n})"

    return format_value


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


def _key_col(key: str, header: str) -> Column:
    return Column(key, header)


def _agg_col(key: str, header: str, fmt: Formatter, rule: str) -> Column:
    return Column(key, header, fmt_agg(fmt, show_n=rule != "value"), align="right", agg=True)


def build_aggregate(
    spec: AggSpec, loaded: LoadResult, diverged_ppl: float = DEFAULT_DIVERGED_PPL, reference: Reference | None = None
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
    across_values: list[Any] = []
    for row in entered:
        group = cells[tuple(row[k] for k in key_names)]
        if spec.across is not None:
            value = row[spec.metrics[0].key]
            if _is_number(value):
                group[row[spec.across]].append(float(value) if isinstance(value, float) else value)
                if row[spec.across] not in across_values:
                    across_values.append(row[spec.across])
            continue
        for key in metric_keys:
            if _is_number(row[key]):
                group[key].append(row[key])
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
        out.append(row)

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
    columns = (*spec.keys, *value_cols)
    table_spec = TableSpec(name=spec.name, title=spec.title, columns=columns, csv_extra=())
    table = Table(spec=table_spec, rows=out, notes=[*notes, *unreadable_notes(loaded.unreadable)])
    if reference is not None and spec.across is None:
        table = add_reference(table, key_names, reference)
    return table


def has_values(table: Table) -> bool:
    return any(isinstance(row.get(col.key), Agg) for row in table.rows for col in table.spec.columns)


def layer_group_label(variant: Any, by_layer: Any) -> str:
    """A run's layer-group setting as a column name: its peft.variant edits and any peft.by_layer value it sets
    ('uniform' when neither is set: the same knobs on every module)."""
    parts = [str(v) for v in variant] if isinstance(variant, list) else []
    if isinstance(by_layer, dict):
        parts += [
            f"{group}.{knob}:{value}"
            for group, knobs in sorted(by_layer.items())
            if isinstance(knobs, dict)
            for knob, value in sorted(knobs.items())
            if value is not None
        ]
    return " ".join(parts) or "uniform"


MODEL = _key_col("model", "model")
LAYERS = _key_col("layer_group", "layer groups")
DATA = _key_col("dataset", "data")
QUANT = _key_col("quant_setting", "quantizer")
METHOD = _key_col("method_name", "method")
R = _num("r", "r", fmt_count)
ALPHA = _num("alpha", "alpha", fmt_count)
UNITS = "Units: GiB = 2^30 bytes, MiB = 2^20 bytes."


def _agg_table(
    name: str,
    title: str,
    keys: tuple[Column, ...],
    metrics: Sequence[tuple],
    rule: str,
    runs: str,
    across: str | None = None,
    notes: tuple[str, ...] = (),
    **kw: Any,
) -> AggSpec:
    """metrics: (key, header, formatter[, rule]); a metric's own rule 'value' prints a value that the configuration
    fixes (size, parameter count) once instead of as mean ± 0 (n) in a table that averages others over seeds."""
    cols = tuple(_agg_col(m[0], m[1], m[2], m[3] if len(m) > 3 else rule) for m in metrics)
    return AggSpec(
        name=name, title=title, keys=keys, metrics=cols, rule=rule, runs=runs, across=across, notes=notes, **kw
    )


PER_DATASET = "Rows: method; columns: fine-tuning data set."
AGGREGATES: dict[str, AggSpec] = {
    spec.name: spec
    for spec in (
        _agg_table(
            "model_size",
            "Model size before and after quantization (thesis 4.1)",
            (MODEL, QUANT),
            [
                ("base_model_bytes", "unquantized (GiB)", fmt_scaled(GIB, 3)),
                ("quantized_model_bytes", "stored (GiB)", fmt_scaled(GIB, 3)),
                ("param_buffer_bytes", "param+buffer (GiB)", fmt_scaled(GIB, 3)),
                ("bits_per_weight", "bits/weight", fmt_fixed(3)),
            ],
            "value",
            "any",
            notes=(
                f"{UNITS} stored: every tensor of the quantized model including quantization state kept "
                "outside parameters (absmax, double-quant state, scales/zeros); param+buffer: parameters and "
                "buffers only, what transformers' get_memory_footprint() and the published tables print. "
                "bits/weight: stored bytes of the quantized linears x 8 / their elements.",
            ),
        ),
        _agg_table(
            "trainable_params",
            "Trainable parameters (thesis 4.3)",
            (MODEL, METHOD, R, ALPHA, LAYERS),
            [("trainable_params", "trainable params", fmt_count), ("trainable_pct", "trainable %", fmt_fixed(4))],
            "value",
            "any",
            notes=("trainable % = 100 x trainable / total parameters of the base model.",),
        ),
        _agg_table(
            "peft_overhead",
            "PEFT memory overhead (thesis 4.4)",
            (MODEL, QUANT, METHOD, R, ALPHA, LAYERS),
            [
                ("adapter_bytes", "adapters (MiB)", fmt_scaled(MIB, 3)),
                ("peft_overhead_bytes", "overhead (MiB)", fmt_scaled(MIB, 3)),
                ("qlora_recipe_overhead_bytes", "QLoRA-recipe overhead (MiB)", fmt_scaled(MIB, 3)),
            ],
            "value",
            "any",
            notes=(
                f"{UNITS} overhead: footprint with adapters minus without, same stage. QLoRA-recipe overhead: "
                "as qlora.py's set-up shows it (norms upcast to fp32, one pad-token row added), which is what "
                "the thesis' table measured.",
            ),
        ),
        _agg_table(
            "perplexity",
            "Mean evaluation perplexity per method and data set (thesis 4.5)",
            (MODEL, QUANT, METHOD),
            [("ppl_after", "held-out ppl after", fmt_fixed(3))],
            "mean_configs",
            "quality",
            across="dataset",
            notes=(
                f"{PER_DATASET} held-out perplexity after fine-tuning (lower is better), averaged over the "
                "(r, alpha) configurations and seeds of each method.",
            ),
        ),
        _agg_table(
            "mmlu",
            "Mean MMLU accuracy per method and data set (thesis 4.8)",
            (MODEL, QUANT, METHOD),
            [("mmlu_after", "MMLU after", fmt_fixed(4))],
            "mean_configs",
            "quality",
            across="dataset",
            notes=(
                f"{PER_DATASET} MMLU 5-shot after fine-tuning (unweighted mean of the 57 subjects), averaged "
                "over the (r, alpha) configurations and seeds of each method.",
            ),
        ),
        _agg_table(
            "gpu_memory",
            "Average GPU memory over the measured steps (thesis 4.10)",
            (MODEL, QUANT, METHOD),
            [("mean_memory_bytes", "mean memory (GiB)", fmt_scaled(GIB, 3))],
            "mean_configs",
            "trained",
            across="dataset",
            notes=(
                f"{PER_DATASET} {UNITS} per run: the mean over the measured steps (after warm-up) of the "
                "allocated memory (CUDA) or peak RSS (CPU), see each record's train.memory_kind; then the "
                "mean over configurations and seeds.",
            ),
        ),
        _agg_table(
            "runtime",
            "Runtime per 500 steps (thesis 4.11)",
            (MODEL, QUANT, METHOD),
            [("time_500_steps_s", "s / 500 steps", fmt_fixed(1))],
            "mean_configs",
            "trained",
            across="dataset",
            notes=(
                f"{PER_DATASET} seconds for 500 training steps, extrapolated from the measured steps after "
                "warm-up (train.time_500_steps_s); then the mean over configurations and seeds.",
            ),
        ),
        _agg_table(
            "qeft_comparison",
            "Comparison in the QEFT study's layout",
            (MODEL, DATA, QUANT, METHOD, R, ALPHA, LAYERS),
            [
                ("bits_per_weight", "bits", fmt_fixed(2), "value"),
                ("quantized_model_bytes", "base (GiB)", fmt_scaled(GIB, 2), "value"),
                ("trainable_params", "tunable params", fmt_count, "value"),
                ("time_500_steps_s", "tuning s/500 steps", fmt_fixed(1)),
                ("gen_tokens_per_s", "gen tokens/s", fmt_fixed(1)),
                *((f"lb_{task}_after", task, fmt_fixed(4)) for task in LEADERBOARD_TASKS),
                ("leaderboard_avg6_after", "avg 6", fmt_fixed(4)),
                ("leaderboard_avg4_after", "avg 4", fmt_fixed(4)),
            ],
            "mean_seeds",
            "quality",
            notes=(
                f"{UNITS} bits: stored bits per weight of the quantized linears; base: the stored quantized "
                "model; gen tokens/s: greedy generation at batch 1 after fine-tuning. Scores: Open LLM "
                "Leaderboard v1 tasks and shots after fine-tuning; avg 6 over all six, avg 4 over ARC-c, "
                "HellaSwag, MMLU and TruthfulQA.",
            ),
        ),
        _agg_table(
            "commonsense",
            "0-shot commonsense accuracy (the key-variable study's tables)",
            (MODEL, QUANT, METHOD, R, LAYERS),
            [
                *((f"cs_{task}_after", task, fmt_fixed(4)) for task in COMMONSENSE_TASKS),
                ("commonsense_after", "avg", fmt_fixed(4)),
            ],
            "mean_seeds",
            "quality",
            notes=(
                "lm-eval 0-shot after fine-tuning: hellaswag and arc_challenge acc_norm, the others acc; avg: "
                "their unweighted mean; each cell the mean ± std over seeds.",
            ),
        ),
        _agg_table(
            "per_configuration",
            "Results per (r, alpha) configuration (thesis B.2-B.7)",
            (QUANT, METHOD, R, ALPHA, LAYERS),
            [
                ("trainable_params", "trainable params", fmt_count, "value"),
                ("ppl_after", "held-out ppl after", fmt_fixed(3)),
                ("mmlu_after", "MMLU after", fmt_fixed(4)),
                ("mean_memory_bytes", "mean memory (GiB)", fmt_scaled(GIB, 3)),
                ("time_500_steps_s", "s / 500 steps", fmt_fixed(1)),
            ],
            "mean_seeds",
            "quality",
            split=("model", "dataset"),
            notes=(
                f"{UNITS} One table per model and fine-tuning data set; one row per quantizer, method and "
                "(r, alpha) configuration (and layer-group setting). held-out ppl and MMLU 5-shot after "
                "fine-tuning; mean memory and time as in the gpu_memory and runtime tables.",
            ),
        ),
        _agg_table(
            "by_layer_group",
            "ppl_after by layer group",
            (MODEL, DATA, QUANT, METHOD, R),
            [("ppl_after", "ppl_after", fmt_plain(3))],
            "mean_seeds",
            "quality",
            across="layer_group",
            across_first=("uniform",),
            notes=(
                "ppl_after: held-out perplexity after fine-tuning (lower is better). Columns: the layer-group "
                "setting (peft.variant edits and peft.by_layer values; 'uniform' = the same knobs on every "
                "module).",
            ),
        ),
    )
}


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


# --------------------------------------------------------------------------- reference values

# Column names of the published-value CSVs in the shared reference folder, mapped onto our metrics. The
# published overhead carries qlora.py's set-up (fp32 norms, a pad-token row), so it compares with that figure,
# and a published quantized size is transformers' get_memory_footprint(), i.e. parameters + buffers; "MB"/"GB"
# there mean MiB/GiB.
REFERENCE_ALIASES = {
    "overhead_published_MB": "qlora_recipe_overhead_MiB",
    "quantized_size_published_GB": "param_buffer_GiB",
}
REFERENCE_UNITS = {"MiB": MIB, "MB": MIB, "GiB": GIB, "GB": GIB}


@dataclass(frozen=True)
class Reference:
    """Published values: a CSV whose key columns are named like a table's key columns (by CSV name, e.g.
    method_name, or by header, e.g. method) and whose value columns are named like a metric key (record units) or
    like a byte metric's stem plus a unit (param_buffer_GiB, peft_overhead_MiB), or as in REFERENCE_ALIASES."""

    path: Path
    header: tuple[str, ...]
    rows: tuple[dict[str, str], ...]


def load_reference(path: str | os.PathLike[str]) -> Reference:
    from qpeft_bench.config import ConfigError

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            # '#' lines are comments, as in the shared reference CSVs.
            reader = csv.DictReader(line for line in handle if not line.startswith("#"))
            rows = tuple(reader)
            header = tuple(reader.fieldnames or ())
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"--reference {path}: cannot read: {exc}") from exc
    if not header:
        raise ConfigError(f"--reference {path}: no header row")
    return Reference(path=Path(path), header=header, rows=rows)


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


def _key_norm(value: Any) -> str:
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
        wanted = [_key_norm(str(row[key]).rstrip("*") if row[key] is not None else None) for _, key in match_on]
        hits = [ref for ref in reference.rows if [_key_norm(ref.get(name)) for name, _ in match_on] == wanted]
        if len(hits) == 1:
            matched += 1
            for key, (name, factor) in metrics.items():
                ref_value = _ref_number(hits[0].get(name))
                ours = row.get(key).mean if isinstance(row.get(key), Agg) else None
                row[f"ref_{key}"] = None if ref_value is None else ref_value * factor
                if ours is not None and ref_value is not None:
                    row[f"diff_{key}"] = ours - row[f"ref_{key}"]
                    row[f"diff_pct_{key}"] = _percent(row[f"diff_{key}"], row[f"ref_{key}"])
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


# --------------------------------------------------------------------------- writers


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
    body = [[_md_cell(col.fmt(row.get(col.key))) for col in columns] for row in table.rows]
    widths = [max(3, len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    rule = ["-" * (w - 1) + ":" if col.align == "right" else "-" * w for w, col in zip(widths, columns, strict=True)]
    lines = [f"## {table.spec.title}", "", _md_line(headers, widths, columns)]
    lines.append("| " + " | ".join(rule) + " |")
    lines += [_md_line(cells, widths, columns) for cells in body]
    if table.notes:
        lines += ["", *(f"- {_md_cell(note)}" for note in table.notes)]
    return "\n".join(lines) + "\n"


def csv_fields(spec: TableSpec) -> list[str]:
    fields = []
    for col in spec.columns:
        fields += [f"{col.key}_mean", f"{col.key}_std", f"{col.key}_n"] if col.agg else [col.key]
    return fields + [k for k in spec.csv_extra if k not in {c.key for c in spec.columns}]


def csv_row(spec: TableSpec, row: Row) -> list[str]:
    cells: Row = dict(row)
    for col in spec.columns:
        if col.agg:
            agg = row.get(col.key)
            cells[f"{col.key}_mean"] = agg.mean if isinstance(agg, Agg) else None
            cells[f"{col.key}_std"] = agg.std if isinstance(agg, Agg) else None
            cells[f"{col.key}_n"] = agg.n if isinstance(agg, Agg) else 0
    return [raw_value(cells.get(key)) for key in csv_fields(spec)]


def render_csv(table: Table) -> str:
    """Raw values under unit-suffixed keys (an aggregated cell as mean, std, n); unreadable records are skipped."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_fields(table.spec))
    writer.writerows(csv_row(table.spec, row) for row in table.rows)
    return buffer.getvalue()


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
        *(" & ".join(latex_escape(col.fmt(row.get(col.key))) for col in columns) + " \\\\" for row in table.rows),
        "\\bottomrule",
        "\\end{tabular}",
    ]
    if table.notes:
        lines += ["\\par\\smallskip", "{\\footnotesize", *(f"{latex_escape(note)}\\par" for note in table.notes), "}"]
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


WRITERS: dict[str, Callable[[Table], str]] = {"md": render_markdown, "csv": render_csv, "tex": render_latex}


def write_table(table: Table, out_dir: Path) -> list[Path]:
    """Write one file per writer (``<name>.md``, ``<name>.csv``, ``<name>.tex``); returns the paths written."""
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
        prog="qpeft-bench-report", description="Summarise run records (result.json) as tables (and figures)."
    )
    parser.add_argument("results_dir", nargs="?", default="runs", help="searched recursively (default: runs)")
    parser.add_argument("--out", default="results/tables", help="output directory (default: results/tables)")
    parser.add_argument(
        "--table",
        choices=[*TABLES, *AGGREGATES, "all"],
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
        metavar="FILE",
        help="CSV of published values: adds a ref and a difference column to the tables whose key "
        "and metric columns it names (see report.Reference)",
    )
    parser.add_argument(
        "--figures",
        action="store_true",
        help="also write figures (PNG, PDF and each one's data as CSV) to the 'figures' folder "
        "beside --out (results/figures by default); needs matplotlib",
    )
    args = parser.parse_args(argv)
    if not args.diverged_ppl > 0:
        parser.error(f"--diverged-ppl must be a positive number, got {args.diverged_ppl}")
    return args


def select_tables(
    loaded: LoadResult, name: str, diverged_ppl: float = DEFAULT_DIVERGED_PPL, reference: Reference | None = None
) -> list[Table]:
    """The tables --table NAME asks for. 'all' leaves out aggregated tables without any value, and pivots whose only
    column is their baseline (by_layer_group over runs that all use uniform knobs compares nothing)."""
    tables = [build_table(spec, loaded) for key, spec in TABLES.items() if name in (key, "all")]
    for key, spec in AGGREGATES.items():
        if name not in (key, "all"):
            continue
        for part_spec, part in split_runs(spec, loaded):
            table = build_aggregate(part_spec, part, diverged_ppl, reference)
            pivot_cols = [col.key for col in table.spec.columns[len(spec.keys) :]]
            baseline_only = spec.across is not None and set(pivot_cols) <= set(spec.across_first)
            if name == key or (has_values(table) and not baseline_only):
                tables.append(table)
    return tables


def split_runs(spec: AggSpec, loaded: LoadResult) -> list[tuple[AggSpec, LoadResult]]:
    """The (spec, runs) of each table an AggSpec makes: itself over every run, or with ``split`` one per distinct
    value of the split keys (sorted), named <name>_<values> and titled with them."""
    if not spec.split:
        return [(spec, loaded)]
    parts: dict[tuple, list[RunRecord]] = defaultdict(list)
    for record in loaded.records:
        row = record_to_row(record)
        parts[tuple(row[k] for k in spec.split)].append(record)
    out = []
    for values in sorted(parts, key=lambda k: tuple(sort_value(v) for v in k)):
        slug = "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", fmt_text(v) or "none") for v in values)
        where = ", ".join(f"{k} {fmt_text(v)}" for k, v in zip(spec.split, values, strict=True))
        out.append(
            (
                replace(spec, name=f"{spec.name}_{slug}", title=f"{spec.title}: {where}"),
                LoadResult(records=parts[values], unreadable=loaded.unreadable),
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from qpeft_bench.config import ConfigError

    args = parse_args(argv)
    root = Path(args.results_dir)
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        print(f"qpeft-bench-report: error: results directory {str(root)!r} {problem}", file=sys.stderr)
        return 1
    try:
        reference = load_reference(args.reference) if args.reference else None
    except ConfigError as exc:
        print(f"qpeft-bench-report: error: {exc}", file=sys.stderr)
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

    tables = select_tables(loaded, args.table, args.diverged_ppl, reference)
    for i, table in enumerate(tables):
        written = write_table(table, Path(args.out))
        sys.stdout.write(("\n" if i else "") + render_markdown(table))
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    if args.figures:
        from qpeft_bench import figures

        try:
            written = figures.write_figures(loaded, figures_dir(Path(args.out)), args.diverged_ppl)
        except figures.MissingDependency as exc:
            print(f"qpeft-bench-report: error: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def figures_dir(tables_dir: Path) -> Path:
    """Figures go beside the tables: results/tables -> results/figures."""
    return tables_dir.parent / "figures"


if __name__ == "__main__":
    raise SystemExit(main())
