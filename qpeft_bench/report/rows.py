"""Flat rows: one dict per run record, under unit-suffixed keys (RECORD_FIELDS) plus the derived keys the aggregated
tables group by; and the total order the tables sort rows in."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from qpeft_bench.evaluation import coverage
from qpeft_bench.evaluation.tasks import TASKS
from qpeft_bench.report.records import RunRecord

Row = dict[str, Any]
FLOAT_MAX = sys.float_info.max
# The lm-eval tasks of the leaderboard and commonsense sets (the evaluation registry); the leaderboard's in the
# order the QEFT comparison table prints them.
_QEFT_ORDER = ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k")
LEADERBOARD_TASKS = tuple(sorted((s.task for s in TASKS["leaderboard"].lm_eval.tasks), key=_QEFT_ORDER.index))
COMMONSENSE_TASKS = tuple(s.task for s in TASKS["commonsense"].lm_eval.tasks)


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
    # before fine-tuning: the published no-fine-tuning rows (report/published.py)
    "leaderboard_avg6_before": ("eval", "before", "leaderboard", "average"),
    "leaderboard_avg4_before": ("eval", "before", "leaderboard", "average_4"),
    **{f"lb_{task}_before": ("eval", "before", "leaderboard", "tasks", task, "value") for task in LEADERBOARD_TASKS},
    **{f"cs_{task}_after": ("eval", "after", "commonsense", "tasks", task, "value") for task in COMMONSENSE_TASKS},
    "items_ref": ("eval", "items"),  # where the run's per-item results are (evaluation/items.py)
    "gen_tokens_per_s": ("eval", "after", "speed", "generation", "tokens_per_s"),
    "forward_ms": ("eval", "after", "speed", "step", "forward_ms"),
    "backward_ms": ("eval", "after", "speed", "step", "backward_ms"),
    "start_time": ("meta", "start_time"),
    "end_time": ("meta", "end_time"),
    "error_type": ("error", "type"),
    "error_message": ("error", "message"),
}


# Row key of {row key: why its value is not the full benchmark} (a limited or fixtures evaluation, the record's
# eval.coverage); tables mark those cells and say why in their notes.
MARKS = "not_full"
# Row key of {row key: stats.Interval} in the per-run tables: a run's own interval (its items resampled).
INTERVALS = "intervals"


def coverage_marks(data: Any) -> dict[str, str]:
    """{RECORD_FIELDS key under eval.<stage>.<task>: why that result is not the full benchmark}."""
    marks = {}
    for key, path in RECORD_FIELDS.items():
        if len(path) > 2 and path[0] == "eval" and path[1] in ("before", "after"):
            why = coverage.not_full(coverage.of(data, path[1], path[2]))
            if why is not None and get_path(data, path) is not None:
                marks[key] = why
    return marks


def get_path(data: Any, path: Sequence[str]) -> Any:
    """Nested lookup that yields None for any missing or wrongly-typed section."""
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


# Fields whose values are lists or mappings by design; any other field holding one is as good as missing (tables group
# rows by these values and format them as numbers or text).
CONTAINER_FIELDS = frozenset({"variant", "by_layer", "losses", "items_ref"})
# Fields that hold names, times and messages; every other scalar field is a number (or a flag) when present.
TEXT_FIELDS = frozenset(
    {
        "run_id",
        "status",
        "mode",
        "model",
        "quant",
        "method",
        "peft_name",
        "dataset",
        "memory_kind",
        "start_time",
        "end_time",
        "error_type",
        "error_message",
    }
)
# How the record writer spells a non-finite float (results._json_safe: str(value)), and JSON5's spellings.
NON_FINITE = frozenset({"nan", "-nan", "+nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity"})


def as_number(value: Any) -> Any:
    """A numeric field's value as the tables compare it: 'nan'/'inf' strings (how records store non-finite floats) as
    the float they stand for, so that an infinite perplexity counts as diverged instead of missing; an integer beyond
    the float range (a corrupt record) as an infinity, which every mean and ratio can take."""
    if isinstance(value, str) and value.strip().lower() in NON_FINITE:
        return float(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > FLOAT_MAX:
        return math.inf if value > 0 else -math.inf
    return value


def record_to_row(record: RunRecord) -> Row:
    """One flat row per record: every RECORD_FIELDS key (None when absent or wrongly typed) plus record_path."""
    row: Row = {}
    for key, path in RECORD_FIELDS.items():
        value = get_path(record.data, path)
        if key in CONTAINER_FIELDS:
            row[key] = value
        elif isinstance(value, (list, dict)):
            row[key] = None
        else:
            row[key] = value if key in TEXT_FIELDS else as_number(value)
    row["record_path"] = str(record.path)
    row[MARKS] = coverage_marks(record.data)
    # A config without a peft section means "base model, no adapter"; without any config we know nothing.
    if row["method"] is None and isinstance(record.data.get("config"), dict):
        row["method"] = "none"
    if row["trainable_pct"] is None:
        row["trainable_pct"] = percent(row["trainable_params"], row["total_params"])
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


def is_number(value: Any) -> bool:
    # bool is an int subclass, but True is not a count.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def percent(part: Any, whole: Any) -> float | None:
    if is_number(part) and is_number(whole) and whole:
        return 100.0 * part / whole
    return None


def sort_value(value: Any) -> tuple[int, float, str]:
    """Total order over mixed cell values: numbers, then strings, then missing (None sorts last)."""
    if is_number(value) and not math.isnan(value):
        return (0, float(value), "")
    if value is None:
        return (2, 0.0, "")
    return (1, 0.0, str(value))


def sort_rows(rows: Iterable[Row], keys: Sequence[str]) -> list[Row]:
    # record_path last so that duplicated run_ids still come out in a stable order.
    return sorted(rows, key=lambda row: [sort_value(row.get(k)) for k in (*keys, "record_path")])
