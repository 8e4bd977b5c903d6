"""A tidy file of published values (--reference published, the shipped published_quality.csv, or any file with its
header): every row checked and its setting parsed into the knobs our runs carry, and the one mapping from the
file's names (model, data, quantizer, method, metric, unit) to our record fields and units. published_table.py
matches the rows to our runs."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qpeft_bench.config import ConfigError
from qpeft_bench.report.formatting import GIB, MIB
from qpeft_bench.report.reference import Reference, key_norm

# ---- The file's names -> ours, declared once. None: not runnable here (the value says why in NOT_RUNNABLE).
MODELS = {
    **{m: m for m in ("llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b", "llama_7b", "opt_1_3b")},
    "llama_65b": None,
    "stablebeluga_13b": None,
    "openorca_openchat_preview2_13b": None,
}
DATA = {
    **{d: d for d in ("unnatural_core", "oasst1", "hh_rlhf", "alpaca", "open_platypus")},
    "guanaco_1k": "guanaco_llama2_1k",
    "none": "",  # no fine-tuning (base evaluations): any data set's runs
    "n/a": "",  # the quantization process alone
}
# published quantizer -> (our quant.name, the row key that holds its bit width, or None where the name fixes it)
QUANTS: dict[str, tuple[str, str | None]] = {
    "none": ("none", None),
    "nf4": ("nf4", None),
    "int8": ("int8", None),
    "smoothquant": ("smoothquant", None),
    "hqq": ("hqq", "quant_nbits"),
    **{q: (q, "quant_bits") for q in ("gptq", "owq", "qeft", "rtn")},
}
# published method (combinations written with '+') -> our peft.name, and the setting modifiers each implies
METHODS = {
    "none": "none",
    **{m: m for m in ("lora", "rslora", "loftq", "ia3", "dora", "qahira", "weak_columns", "qa_lora")},
    "rslora+loftq": "loftq_rslora",
    "dora+rslora": "dora_rslora",
    "dora+loftq": "dora_loftq",
}
# published unit -> factor from our record's unit (accuracies are fractions, sizes bytes, counts plain)
UNITS = {"%": 100.0, "ppl": 1.0, "GB": 1 / GIB, "MB": 1 / MIB, "M": 1e-6, "s": 1.0, "min": 1 / 60, "h": 1 / 3600}
UNITS |= {"tokens/s": 1.0, "ms": 1.0, "ratio": 1.0}
COMMONSENSE = {"hellaswag": "hellaswag", "arc_e": "arc_easy", "arc_c": "arc_challenge", "piqa": "piqa"}
COMMONSENSE |= {"winogrande": "winogrande", "boolq": "boolq", "obqa": "openbookqa"}
LEADERBOARD = {"mmlu_5shot": "mmlu", "hellaswag": "hellaswag", "arc_c": "arc_challenge", "gsm8k": "gsm8k"}
LEADERBOARD |= {"truthfulqa_mc2": "truthfulqa_mc2", "winogrande": "winogrande"}


@dataclass(frozen=True)
class Field:
    """Where our record keeps a published metric: the row key after fine-tuning, and before (the quantized base)."""

    after: str
    before: str | None
    unit: str


# published metric -> Field, the same in every study
METRICS: dict[str, Field] = {
    "ppl_heldout": Field("ppl_after", "ppl_before", "ppl"),
    "ppl_wikitext": Field("wikitext_ppl_after", "wikitext_ppl_before", "ppl"),
    "commonsense_avg": Field("commonsense_after", "commonsense_before", "%"),
    "leaderboard_avg6": Field("leaderboard_avg6_after", "leaderboard_avg6_before", "%"),
    "leaderboard_avg4": Field("leaderboard_avg4_after", "leaderboard_avg4_before", "%"),
    "runtime_s_per_500_steps": Field("time_500_steps_s", None, "s"),
    "inference_tokens_per_s": Field("gen_tokens_per_s", None, "tokens/s"),
    "base_size_gb": Field("quantized_model_bytes", "quantized_model_bytes", "GB"),
    "trainable_params": Field("trainable_params", None, "M"),
    "forward_ms": Field("forward_ms", None, "ms"),
    "backward_ms": Field("backward_ms", None, "ms"),
}
# source -> {published metric -> Field} where the studies mean different evaluations by one name: the key-variable
# study's tasks are 0-shot commonsense, the QEFT study's the leaderboard's few-shot ones (its MMLU too); the thesis'
# GPU memory is the mean over the measured steps (4.10), the QEFT study's the training footprint (peak, Table 10)
BY_SOURCE: dict[str, dict[str, Field]] = {
    "thesis": {
        "mmlu_5shot": Field("mmlu_after", "mmlu_before", "%"),
        "gpu_memory_gb": Field("mean_memory_bytes", None, "GB"),
    },
    "keyvar": {m: Field(f"cs_{t}_after", None, "%") for m, t in COMMONSENSE.items()},
    "qeft": {
        "gpu_memory_gb": Field("peak_memory_bytes", None, "GB"),
        **{m: Field(f"lb_{t}_after", f"lb_{t}_before", "%") for m, t in LEADERBOARD.items()},
    },
}
NOT_RUNNABLE = {
    "model": "not in conf/model",
    "inference_speedup": "a ratio to the study's FP16 row, not a record field",
    "tuning_gpu_hours": "GPU hours of the study's full epoch; records keep s/step and time per 500 steps",
    "fwd_bwd_total_ms": "not a record field (forward_ms + backward_ms)",
    "quantization_time_min": "the quantization process is not timed in records",
    "quantized_storage_mb": "the quantization process's storage is not a record field",
    "quantization_peak_gpu_memory_gb": "the quantization process's peak memory is not a record field",
    "ppl_unspecified": "the study does not say which evaluation set",
}


def metric_field(source: str, metric: str) -> Field | None:
    return BY_SOURCE.get(source, {}).get(metric) or METRICS.get(metric)


def mapped_fields() -> list[Field]:
    return [*METRICS.values(), *(f for fields in BY_SOURCE.values() for f in fields.values())]


# ---- Settings
KINDS = ("config", "layer_group", "weak_columns", "base", "mean", "quantization", "not_reproducible")


@dataclass(frozen=True)
class Setting:
    """A row's setting as the knobs our runs carry; None: not stated (any of ours matches)."""

    kind: str  # a KINDS value
    r: int | None = None
    alpha: int | None = None
    modifiers: frozenset[str] = frozenset()  # rslora, loftq ('+ RsLoRA', '+ LoftQ')
    layer_group: str | None = None  # as rows.layer_group_label writes it
    lambdas: tuple[int, int] | None = None  # peft.lambda1, lambda2 outside the edited group
    k: int | None = None
    group_size: int | None = None
    lr: float | None = None
    targets: str | None = None  # 'all' | 'mlp'
    configs_of: str | None = None  # mean: the table whose (r, alpha) configurations it averages
    exclude: tuple[tuple[int, int], ...] = ()  # mean: configurations left out
    seeds: int | None = None
    why: str = ""  # not_reproducible: why


class SettingError(ValueError):
    pass


GROUPS = "attn|mlp|first_half|second_half"
CONFIG = re.compile(r"r=(\d+) alpha=(\d+)((?: \+ (?:LoftQ|RsLoRA))*)")
# whole settings that decide the kind by themselves: (pattern, kind, fields from the match)
WHOLE = [
    (r"(?:PEFT|QEFT) merging: .*", "not_reproducible", lambda m: {"why": "merges an update into a released model"}),
    (r"FT: released fully fine-tuned .*", "not_reproducible", lambda m: {"why": "a released fine-tuned model"}),
    (
        r"k=(\d+); (online reordering|no reordering, group-wise|OGR \(offline global reordering\), per-channel).*",
        "not_reproducible",
        lambda m: {"k": int(m[1]), "why": "a reordering ablation of OWQ that conf/quant has no option for"},
    ),
    (r"k=(\d+); OWQ configuration: .*", "weak_columns", lambda m: {"k": int(m[1])}),
    (
        r"k=(\d+); OGR \+ group-wise quantization \(g(\d+)\) = QEFT",
        "weak_columns",
        lambda m: {"k": int(m[1]), "group_size": int(m[2])},
    ),
    (r"base-model quantizer \w+, then fine-tuned; k not stated", "weak_columns", lambda m: {}),
    (r"(?:.*\b)?(?:no fine-tuning|pre-trained)\b.*", "base", lambda m: {}),
    (
        r"quantization process, .*?(?:k=(\d+))?",
        "quantization",
        lambda m: {"k": int(m[1]) if m[1] else None, "why": "the quantization process alone, which no record times"},
    ),
    (
        r"mean over the \(r,alpha\) configs of (Table B\.\d+)(?: excluding (.*?)(?: \(row .*\))?)?",
        "mean",
        lambda m: {"configs_of": m[1], "exclude": _excluded(m[2])},
    ),
    (r"single configuration(?: \(.*\))?", "config", lambda m: {}),
    (r"baseline: one rank everywhere", "layer_group", lambda m: {"layer_group": "uniform"}),
    (
        r"baseline: lambda1=(\d+) lambda2=(\d+) everywhere",
        "layer_group",
        lambda m: {"layer_group": "uniform", "lambdas": (int(m[1]), int(m[2]))},
    ),
    (rf"({GROUPS})\.r/(\d+) \(.*\)", "layer_group", lambda m: {"layer_group": f"{m[1]}.r/{m[2]}"}),
    (
        rf"({GROUPS}) lambda1=(\d+) lambda2=(\d+) \(others lambda1=(\d+) lambda2=(\d+)\)",
        "layer_group",
        lambda m: {"layer_group": f"{m[1]}.lambda1:{m[2]} {m[1]}.lambda2:{m[3]}", "lambdas": (int(m[4]), int(m[5]))},
    ),
]
# the clauses (', '-separated) of a configuration or weak-column setting: (pattern, fields from the match)
CLAUSES = [
    (CONFIG.pattern, lambda m: {"r": int(m[1]), "alpha": int(m[2]), "modifiers": _modifiers(m[3])}),
    (r"(?:LoRA )?r=(\d+)", lambda m: {"r": int(m[1])}),
    (r"(?:LoRA|QLoRA|QA-LoRA) (?:on )?all linear(?: layers)?", lambda m: {"targets": "all"}),
    (r"Platypus recipe: LoRA on FFN(?: only)?", lambda m: {"targets": "mlp"}),
    (r"k=(\d+)(?: \(weak column tuning\))?", lambda m: {"k": int(m[1]), "kind": "weak_columns"}),
    (r"group_size=(\d+)", lambda m: {"group_size": int(m[1])}),
    (r"lr=(\d+(?:\.\d+)?e-\d+)", lambda m: {"lr": float(m[1])}),
    # no knob: the base is the row's quant column (NF4's blocks are 64 in every run), r and alpha unstated match any
    (r"(?:FP16|8-bit) base|NF4 group 64|r/alpha not stated", lambda m: {}),
    (r"QLoRA-style LoRA on the SmoothQuant model", lambda m: {}),
]
SEEDS = re.compile(r"; seed avg of (\d+)$")


def _modifiers(text: str) -> frozenset[str]:
    return frozenset(part.strip().lower() for part in text.split("+") if part.strip())


def _excluded(text: str | None) -> tuple[tuple[int, int], ...]:
    if not text:
        return ()
    found = CONFIG.findall(text)
    if not found:
        raise SettingError(f"cannot read the configurations excluded in {text!r}")
    return tuple((int(r), int(alpha)) for r, alpha, _ in found)


def parse_setting(row: Mapping[str, str]) -> Setting:
    """The structured setting of one tidy row (its 'setting' text, checked against its method, r and alpha columns);
    raises SettingError for a setting no rule reads."""
    text = " ".join(str(row.get("setting") or "").split())
    seeds = SEEDS.search(text)
    text = SEEDS.sub("", text).replace(" (Table 4)", "")
    fields: dict[str, Any] | None = None
    for pattern, kind, make in WHOLE:
        match = re.fullmatch(pattern, text)
        if match:
            fields = {"kind": kind, **make(match)}
            break
    if fields is None:
        fields = {"kind": "config"}
        for clause in text.replace("; ", ", ").split(", ") if text else ():
            for pattern, make in CLAUSES:
                match = re.fullmatch(pattern, clause)
                if match:
                    fields.update(make(match))
                    break
            else:
                raise SettingError(f"unknown setting {row.get('setting')!r} (no rule reads {clause!r})")
    setting = Setting(**fields, seeds=int(seeds[1]) if seeds else None)
    unquantized = re.search(r"before quantization|unquantized|FP16 base", text)
    if setting.kind == "base" and unquantized and row.get("quant") != "none":
        raise SettingError(f"setting {row.get('setting')!r} is unquantized, the quant column {row.get('quant')!r}")
    if setting.kind in ("config", "weak_columns", "mean"):
        setting = replace(setting, layer_group="uniform")
    method = str(row.get("method") or "")
    if not setting.modifiers <= set(method.split("+")):
        raise SettingError(
            f"setting {row.get('setting')!r} names {', '.join(sorted(setting.modifiers))}, method {method!r}"
        )
    for name in ("r", "alpha"):
        said, column = getattr(setting, name), str(row.get(name) or "")
        if said is not None and key_norm(said) != key_norm(column):
            raise SettingError(f"setting {row.get('setting')!r} says {name}={said}, the {name} column {column!r}")
    return setting


# ---- The file
@dataclass(frozen=True)
class PublishedRow:
    number: int  # 1-based data row of the file
    cells: Mapping[str, str]  # the row as read
    value: float | None  # None: printed without a number (OOM)
    setting: Setting
    configs: tuple[tuple[int, int], ...] = ()  # mean: the (r, alpha) configurations it averages

    def __getitem__(self, key: str) -> str:
        return self.cells[key]

    def number_of(self, key: str) -> int | None:
        return int(self.cells[key]) if self.cells[key] else None


@dataclass(frozen=True)
class Published:
    path: Path
    rows: tuple[PublishedRow, ...]


def load_published(reference: Reference) -> Published:
    """Check and parse every row of a tidy file; a bad row is one ConfigError naming the file and the row."""
    rows = []
    for number, cells in enumerate(reference.rows, start=1):
        where = f"--reference {reference.path}: row {number} ({cells.get('source')} {cells.get('table')})"
        try:
            value = float(cells["value"]) if cells["value"] not in (None, "") else None
            if value is not None and not math.isfinite(value):
                raise ValueError(cells["value"])
        except ValueError:
            raise ConfigError(f"{where}: value {cells['value']!r} is not a number") from None
        for name in ("bits", "r", "alpha"):
            if not re.fullmatch(r"\d*", cells[name] or ""):
                raise ConfigError(f"{where}: {name} {cells[name]!r} is not a whole number")
        if cells["unit"] not in UNITS:
            raise ConfigError(f"{where}: unit {cells['unit']!r} unknown (one of {', '.join(UNITS)})")
        known = {"model": ("MODELS", MODELS), "data": ("DATA", DATA), "quant": ("QUANTS", QUANTS)}
        for name, (table, names) in {**known, "method": ("METHODS", METHODS)}.items():
            if cells[name] not in names:
                raise ConfigError(f"{where}: {name} {cells[name]!r} unknown (report/published.py {table})")
        try:
            setting = parse_setting(cells)
        except SettingError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        found = metric_field(cells["source"], cells["metric"])
        if found is not None and found.unit != cells["unit"]:
            raise ConfigError(f"{where}: {cells['metric']} in {cells['unit']!r}, ours maps it from {found.unit!r}")
        rows.append(PublishedRow(number, cells, value, setting))
    return Published(reference.path, tuple(_with_configs(rows, reference.path)))


def _with_configs(rows: list[PublishedRow], path: Path) -> list[PublishedRow]:
    """A mean row with the (r, alpha) configurations of the table it averages (same model, data, quantizer, bits and
    method), less those it excludes; a mean over none is an error."""
    same = ("model", "data", "quant", "bits", "method")
    out = []
    for row in rows:
        if row.setting.kind == "mean":
            configs = {
                (other.number_of("r"), other.number_of("alpha"))
                for other in rows
                if other["table"] == row.setting.configs_of and all(other[k] == row[k] for k in same)
            }
            row = replace(row, configs=tuple(sorted(c for c in configs if c not in row.setting.exclude)))
            if not row.configs:
                where = f"--reference {path}: row {row.number} ({row['source']} {row['table']})"
                raise ConfigError(f"{where}: a mean over {row.setting.configs_of}, which has no row of its kind")
        out.append(row)
    return out
