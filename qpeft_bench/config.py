"""Schemas of the run configuration.

Values live in the YAML files under `conf/`; the types, defaults and the checks of each section alone live here.
This module is the floor every component stands on, so it imports nothing from the package: the checks that
combine sections or ask a component (`spec.validate`) sit above the components. `from_dict` turns each section of
the composed Hydra config into a plain dataclass *before any model is loaded*, so a typo or an impossible
combination fails in a second with one actionable line instead of a shape error deep inside a forward.
Hydra already rejects overrides of keys that do not exist (`peft.foo=1`); this module also rejects unknown keys
that come from YAML files or `+key=` overrides, and wrong types.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the key, the value and what is allowed."""


# --------------------------------------------------------------------------------------------------------------
# Generic dict -> dataclass conversion with strict keys and types
# --------------------------------------------------------------------------------------------------------------


def type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(type_ok(v, inner) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:  # YAML writes 1 for 1.0; accept ints where floats are expected, never bools
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(tp) is typing.Literal:
        return value in typing.get_args(tp)
    return isinstance(value, tp)


def _first(value: Any, bad: Callable[[Any], bool]) -> Any:
    """The first scalar of a value (nested lists and mappings included) for which `bad` holds, or None."""
    if isinstance(value, (dict, list, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            found = _first(item, bad)
            if found is not None:
                return found
        return None
    return value if bad(value) else None


def _non_finite(value: Any) -> float | None:
    """The first NaN or infinity in a value, or None. No knob means anything by NaN or infinity: `lr=inf` would be
    filed as a diverged run and `max_grad_norm=nan` would turn clipping off."""
    return _first(value, lambda v: isinstance(v, float) and not math.isfinite(v))


INT_LIMIT = 2**32  # beyond every count of a run (steps, batch, ranks, tokens) and every seed (< 2**32)


def _huge_int(value: Any) -> int | None:
    """The first integer beyond INT_LIMIT in a value, or None: a run with train.grad_accum=10**23 passes every type
    check and then never finishes its first step."""
    return _first(value, lambda v: isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT_LIMIT)


def _wrong_type(key: str, value: Any, tp: Any) -> str:
    """The wrong-type line; for a list of the wrong elements, the first wrong element and what it should be."""
    args = typing.get_args(tp)
    alternatives = args if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    lists = [a for a in alternatives if typing.get_origin(a) in (list, tuple)]
    if isinstance(value, (list, tuple)) and lists:
        (inner, *_) = typing.get_args(lists[0]) or (Any,)
        for i, item in enumerate(value):
            if not type_ok(item, inner):
                return f"{key}[{i}]={item!r} has the wrong type: expected {_type_name(inner)} (in a list of them)"
    return f"{key}={value!r} has the wrong type: expected {_type_name(tp)}"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def from_dict(cls: type, data: dict, where: str) -> Any:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError naming `where.key`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""  # where="" for the top level of the config
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{f' of {where}' if where else ' at the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{prefix}{f.name} is required")
            continue
        value = data[f.name]
        if not type_ok(value, hints[f.name]):
            raise ConfigError(_wrong_type(f"{prefix}{f.name}", value, hints[f.name]))
        bad = _non_finite(value)
        if bad is not None:
            raise ConfigError(f"{prefix}{f.name}={value!r} holds {bad}: every number of the config must be finite")
        big = None if f.name.endswith("seed") else _huge_int(value)  # seeds: seed_ok says their range
        if big is not None:
            holds = "" if big is value else f" holds {big}:"
            raise ConfigError(
                f"{prefix}{f.name}={value!r}{holds or ':'} no count, size or seed of a run goes beyond 2**32 "
                "(a typo, or an exponent where a count was meant?)"
            )
        kwargs[f.name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def positive(where: str, name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}.{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


SEED_LIMIT = 2**32  # numpy's and CUDA's generators take seeds below 2**32; torch's CPU one raises past 2**64


def path_ok(where: str, name: str, value: str | None) -> None:
    """A path knob is null or names something: `data.path=` (an unset variable) would otherwise mean the current
    directory, and a literal `~` that names no home would become a folder called `~...`."""
    key = f"{where}.{name}" if where else name
    if value is None:
        return
    if not value.strip():
        raise ConfigError(f"{key} is empty (an unset variable in a job script?); give a path or null")
    if value.startswith("~") and os.path.expanduser(value) == value:  # Path.expanduser raises instead
        raise ConfigError(f"{key}={value!r}: {value.split('/')[0]} names no home directory on this machine")


def seed_ok(where: str, name: str, value: int) -> None:
    if not 0 <= value < SEED_LIMIT:
        key = f"{where}.{name}" if where else name
        raise ConfigError(f"{key}={value} is out of range: a seed lies in 0 .. 2**32 - 1")


# --------------------------------------------------------------------------------------------------------------
# Groups whose schema does not depend on the option chosen
# --------------------------------------------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """An architecture card: enough to build the model on the meta device, plus where the weights are."""

    name: str  # auto: the last part of model.path or model.hub_id (a model without a card)
    family: str | None = "llama"  # a transformers model_type (qpeft_bench/families.py); null: from config.json
    hub_id: str | None = None  # used when path is null
    path: str | None = None  # local directory in save_pretrained layout; wins over hub_id
    dtype: str = "bfloat16"  # dtype of the unquantized weights (base_model_bytes is counted in it)
    arch: dict | None = None  # transformers config fields; null: read config.json from path
    linear_names: list[str] | None = None  # the block linears quantized and adapted; null: all of the family's
    notes: str = ""

    def check(self, where: str) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"{where}.dtype={self.dtype!r}; choose one of {', '.join(DTYPES)}")
        path_ok(where, "path", self.path)
        if self.path is None and self.hub_id is None:
            raise ConfigError(f"{where}: set model.path (a local directory) or model.hub_id")
        if self.path is not None and not Path(self.path).is_dir():
            raise ConfigError(f"{where}.path={self.path!r} is not a directory (save_pretrained layout expected)")
        if self.arch is None and self.path is not None and not (Path(self.path) / "config.json").is_file():
            raise ConfigError(f"{where}.path={self.path!r} has no config.json and the card has no arch")
        if self.linear_names is not None and not self.linear_names:
            raise ConfigError(f"{where}.linear_names is empty; null means all of the family's linears")
        if self.family is None and self.arch is not None:
            raise ConfigError(f"{where}.family is null but the card has an arch: name its model_type")

    def checkpoint_config(self) -> tuple[dict, str] | None:
        """The checkpoint's own config.json and where it was read: at `path`, or (path null) the hub id's snapshot
        in the local Hugging Face cache; None when neither is on this machine. Never downloads."""
        if self.path is not None:
            file = Path(self.path) / "config.json"
        elif self.hub_id:
            file = cached_hub_file(self.hub_id, "config.json")
        else:
            file = None
        if file is None or not file.is_file():
            return None
        try:
            return json.loads(file.read_text()), str(file)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model {self.name!r}: {file} is not readable JSON ({err})") from err

    def arch_dict(self) -> dict:
        """The architecture as transformers config fields, without loading any weight."""
        if self.arch is not None:
            return {"model_type": self.family, **self.arch}
        found = self.checkpoint_config()
        if found is None:
            raise ConfigError(
                f"model {self.name!r} has no arch in its card, no local path and {self.hub_id!r} is not in the local "
                "Hugging Face cache (HF_HOME); plan mode and the pre-flight checks need the architecture without "
                "downloading: add an `arch:` section to the card, set model.path, or download the model first"
            )
        return found[0]


def cached_hub_file(hub_id: str, filename: str) -> Path | None:
    """`filename` of the hub repository's snapshot in the local Hugging Face cache, or None; never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(hub_id, filename)
    return Path(found) if isinstance(found, str) else None


@dataclass
class DataConfig:
    name: str
    format: str = "alpaca"  # loader in qpeft_bench.data
    hub_id: str | None = None
    path: str | None = None  # local file in the hub's schema; wins over hub_id
    variant: str | None = None
    # Alpaca's prompt (data_formats.ALPACA_TEMPLATES): qlora, QLoRA's ("### Response: ", the studies'), or stanford,
    # Stanford Alpaca's train.py ("### Response:"); formats with their own layout take only the default
    template: str = "qlora"
    val_fraction: float = 0.2
    split_seed: int = 42
    max_source_len: int = 384
    max_target_len: int = 128
    train_on_source: bool = False
    group_by_length: bool = True
    max_examples: int | None = None

    def check(self, where: str) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"{where}.val_fraction={self.val_fraction} must lie strictly between 0 and 1")
        positive(where, "max_source_len", self.max_source_len)
        positive(where, "max_target_len", self.max_target_len)
        positive(where, "max_examples", self.max_examples)
        seed_ok(where, "split_seed", self.split_seed)
        path_ok(where, "path", self.path)
        if self.path is None and self.hub_id is None:
            raise ConfigError(f"{where}: set data.path (a local file) or data.hub_id")
        if self.template not in ("qlora", "stanford"):
            raise ConfigError(
                f"{where}.template={self.template!r} is not a prompt template; choose qlora (QLoRA's Alpaca prompt, "
                "the default) or stanford (Stanford Alpaca's train.py prompt)"
            )


@dataclass
class TrainConfig:
    max_steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1  # optimizer step every grad_accum micro-batches; a "step" is an optimizer step
    lr: float = 2e-4
    lr_scheduler: typing.Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    optimizer: typing.Literal["auto", "adamw", "paged_adamw_32bit"] = "auto"  # auto: paged on CUDA
    # dtype of matmuls (autocast) and of bitsandbytes' compute; auto: model.dtype. float16 uses loss scaling.
    compute_dtype: typing.Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    upcast_norms_fp32: bool = False  # qlora.py's end state: norms in fp32 (moves peak memory on 7B)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10
    measure_after: int = 2  # steps excluded from time and memory figures (warm-up)
    diverge_loss: float = 1e4  # a loss above this (or NaN/Inf) ends the run with status `diverged`
    save_adapter: bool = True  # write the trained adapters to <run dir>/adapter/ (reloadable onto the base)
    # data parallelism (qpeft_bench/distributed.py) under torchrun, one process per GPU: ddp, or fsdp (sharded)
    checkpoint_every: int = 0  # save a resumable checkpoint every N optimizer steps (0: never); see checkpoint.py
    distributed: typing.Literal["none", "ddp", "fsdp"] = "none"
    gpus: int = 1  # processes (GPUs) of the job; part of the run's identity, since the global batch scales with it
    # Speed switches (speedups.py, fused_lora.py, chunked_loss.py): each computes the same function, faster or leaner.
    # auto: on for peft's LoRA family (LoRA, rsLoRA, DoRA, LoftQ), which it computes as one autograd function per
    # linear; true: the same, but an error for other methods; false: peft's own layers
    fused_lora: bool | str = "auto"
    chunked_loss: int = 0  # tokens per chunk of lm_head + cross-entropy, logits recomputed in backward (0: off)
    compile: bool | str = "auto"  # torch.compile each decoder layer; auto: CUDA, measured quantizers (speedups.py)
    # GiB, or auto (most of the card): choose checkpointing, upcast and loss chunking from the plan-mode estimate
    memory_budget: str | float | None = None
    reuse_base: bool = True  # a sweep's runs with the same model and quantizer quantize once per process

    def check(self, where: str) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "lr", "log_every", "diverge_loss"):
            positive(where, name, getattr(self, name))
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "measure_after", "checkpoint_every"):
            positive(where, name, getattr(self, name), allow_zero=True)
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"{where}.warmup_steps={self.warmup_steps} exceeds {where}.max_steps={self.max_steps}: the learning "
                f"rate would never reach {where}.lr; lower the warm-up"
            )
        if self.measure_after >= self.max_steps:
            raise ConfigError(
                f"{where}.measure_after={self.measure_after} must be below train.max_steps={self.max_steps}: "
                "no step would be measured"
            )
        positive(where, "gpus", self.gpus)
        if self.distributed == "none" and self.gpus != 1:
            raise ConfigError(f"{where}.gpus={self.gpus} needs {where}.distributed=ddp or fsdp")
        positive(where, "chunked_loss", self.chunked_loss, allow_zero=True)
        for name in ("fused_lora", "compile"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ConfigError(f"{where}.{name}={getattr(self, name)!r}; choose true, false or auto")
        if self.memory_budget is not None and self.memory_budget != "auto":
            try:
                budget = float(self.memory_budget)
            except (TypeError, ValueError):
                budget = 0.0
            if not (budget > 0 and math.isfinite(budget)):
                raise ConfigError(
                    f"{where}.memory_budget={self.memory_budget!r}; give GiB (a positive number), auto or null"
                )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"{where}.device={self.device!r}; choose auto, cpu, cuda or cuda:N")

    def check_device(self) -> None:
        """Checks that depend on this machine: only for runs that will train here."""
        import torch

        cuda = self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"train.device={self.device!r} but CUDA is not available on this machine")
        if self.optimizer == "paged_adamw_32bit" and not cuda:
            raise ConfigError("train.optimizer=paged_adamw_32bit needs CUDA; use adamw (or auto) on the CPU")


@dataclass
class WikitextConfig:
    """ppl_wikitext: windowed token perplexity of a WikiText-style test split (qpeft_bench/evaluation/perplexity.py)."""

    path: str | None = None  # a local file in the hub's schema (jsonl/json/parquet with "text", or raw text); wins
    hub_id: str = "wikitext"
    variant: str | None = "wikitext-2-raw-v1"
    split: str = "test"
    seq_len: int | None = None  # window length; null: min(model context, 2048), the studies' 2048 for LLaMA
    max_windows: int | None = None  # cap for smoke runs; null: every window

    def check(self, where: str) -> None:
        positive(where, "seq_len", self.seq_len)
        positive(where, "max_windows", self.max_windows)
        path_ok(where, "path", self.path)
        if self.path is not None and not Path(self.path).is_file():
            raise ConfigError(f"{where}.path={self.path!r} does not exist")


@dataclass
class HarnessConfig:
    """mmlu, commonsense, leaderboard: lm-eval task sets on the in-memory model (evaluation/harness.py)."""

    batch_size: int = 8  # requests per forward
    limit: int | None = None  # items per task (smoke runs); null: all
    max_gen_toks: int | None = None  # cap on generated tokens (GSM8k) for smoke runs; recorded when set

    def check(self, where: str) -> None:
        positive(where, "batch_size", self.batch_size)
        positive(where, "limit", self.limit)
        positive(where, "max_gen_toks", self.max_gen_toks)


@dataclass
class SpeedConfig:
    """speed: generated tokens/s at batch 1 and forward/backward ms of one step (evaluation/throughput.py)."""

    new_tokens: int = 256
    repeats: int = 5  # medians over these, after one warm-up
    seq_len: int = 512  # the training step's sequence length
    batch_size: int = 1
    gradient_checkpointing: bool = True

    def check(self, where: str) -> None:
        for name in ("new_tokens", "repeats", "seq_len", "batch_size"):
            positive(where, name, getattr(self, name))


@dataclass
class EvalConfig:
    name: str
    tasks: list[str] = field(default_factory=lambda: ["ppl_heldout"])
    before_finetune: bool = True  # also evaluate the quantized base (the "no fine-tuning" row); speed: after only
    cache_base: bool = True  # reuse the quantized base's results across runs ($QPEFT_CACHE/base_eval)
    batch_size: int = 8  # held-out and WikiText perplexity
    max_batches: int | None = None  # held-out perplexity cap for smoke runs; null: the whole split
    data_root: str | None = None  # local benchmark data in the hub's layout; null: $QPEFT_EVAL_DATA, else the hub
    wikitext: Any = None  # WikitextConfig after validate()
    harness: Any = None  # HarnessConfig
    speed: Any = None  # SpeedConfig

    def check(self, where: str) -> None:
        # the names are the evaluation registry's: evaluation/checks.py checks them (this module imports nothing)
        if not self.tasks:
            raise ConfigError(f"{where}.tasks is empty; list at least one task (ppl_heldout is the cheapest)")
        path_ok(where, "data_root", self.data_root)
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"{where}.tasks={self.tasks} lists a task twice")
        positive(where, "batch_size", self.batch_size)
        positive(where, "max_batches", self.max_batches)
        self.wikitext = from_dict(WikitextConfig, self.wikitext or {}, f"{where}.wikitext")
        self.harness = from_dict(HarnessConfig, self.harness or {}, f"{where}.harness")
        self.speed = from_dict(SpeedConfig, self.speed or {}, f"{where}.speed")


@dataclass
class CalibConfig:
    """Calibration data: statistics for the quantizers that need them and the batch every quantizer's output
    error is measured on."""

    name: str
    source: typing.Literal["finetune", "text", "none"] = "finetune"  # finetune: the training split's text
    path: str | None = None  # source=text: a local UTF-8 text file
    samples: int = 64  # windows of seq_len tokens at seeded random offsets
    seq_len: int = 256
    probe_samples: int = 1  # windows (the first ones) on which each layer's output error is measured
    seed: int = 0
    # Block-by-block calibration (the GPTQ/OWQ/QEFT reference procedure): each decoder block's statistics come
    # from the outputs of the blocks before it, already quantized, and only one block's statistics are held at
    # once. false: one pass of the unquantized model, every layer's statistics held together (faster on small
    # models, more memory, no layer sees the error of the layers before it). Quantizers without it ignore it.
    sequential: bool = True
    # Bring the base in from its safetensors checkpoint one block at a time (models.BlockLoader), so that no more
    # than one block is ever held in full precision: what lets a 70B GPTQ/OWQ/QEFT base be built on one GPU and a
    # normal node's CPU memory. The quantized model is the same either way. auto: when calibration is block by
    # block and the checkpoint is local safetensors (model.path or the HF cache); true: always for those quantizers
    # (refused where it cannot be, and for quantizers that do not calibrate block by block); false: load whole first.
    load_by_block: bool | str = "auto"

    def check(self, where: str) -> None:
        if self.load_by_block not in (True, False, "auto"):
            raise ConfigError(f"{where}.load_by_block={self.load_by_block!r}; choose true, false or auto")
        for name in ("samples", "seq_len", "probe_samples"):
            positive(where, name, getattr(self, name))
        seed_ok(where, "seed", self.seed)
        path_ok(where, "path", self.path)
        if self.probe_samples > self.samples:
            raise ConfigError(f"{where}.probe_samples={self.probe_samples} exceeds {where}.samples={self.samples}")
        if self.source == "text":
            if self.path is None:
                raise ConfigError(f"{where}.source=text needs {where}.path (a local text file)")
            if not Path(self.path).is_file():
                raise ConfigError(f"{where}.path={self.path!r} does not exist")

    @property
    def enabled(self) -> bool:
        return self.source != "none"


@dataclass
class WandbConfig:
    project: str = "qpeft-bench"
    mode: typing.Literal["offline", "online"] = "offline"  # offline: files only, `wandb sync` them later
    dir: str | None = None  # null: the run directory


@dataclass
class RunConfig:
    """The top-level keys of conf/run.yaml."""

    mode: typing.Literal["train", "plan", "eval"] = "train"
    seed: int = 0
    output_root: str = "runs"
    overwrite: bool = False
    run_dir: str | None = None  # mode=eval: the completed run to re-evaluate from its saved adapter
    logger: typing.Literal["none", "wandb"] = "none"  # wandb: mirror the finished record (qpeft_bench/tracking.py)
    wandb: dict = field(default_factory=dict)  # project, mode (offline | online), dir

    def check(self, where: str) -> None:
        seed_ok(where, "seed", self.seed)
        path_ok(where, "run_dir", self.run_dir)
        path_ok("wandb", "dir", from_dict(WandbConfig, self.wandb, "wandb").dir)


@dataclass
class RunSpec:
    """Everything a run needs, validated. Library code receives pieces of it as plain arguments."""

    mode: str
    seed: int
    model: ModelConfig
    quant_name: str
    quant: Any  # the quantizer's own Config dataclass
    peft_method: str  # the adapter module (lora for rslora/dora/loftq too)
    peft_name: str  # the peft/ option chosen (dora, loftq, ...), for tables
    peft: Any  # the PEFT method's own Config dataclass
    peft_targets: list[str] | None  # linear names that get adapters; None: all of model.linear_names
    data: DataConfig
    calib: CalibConfig
    train: TrainConfig
    eval: EvalConfig
    overwrite: bool
    run_dir: str | None = None
    peft_per_module: dict = field(default_factory=dict)  # {module: Config} where peft.by_layer sets knobs


def adapter_target(module_name: str, peft_targets: list[str] | None) -> bool:
    """Whether a quantized target linear also gets an adapter (peft.targets null: all of them)."""
    return peft_targets is None or module_name.rsplit(".", 1)[-1] in peft_targets
