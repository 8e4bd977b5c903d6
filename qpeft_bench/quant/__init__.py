"""Quantizers of the frozen base model: one module each, dispatched through a small table.

`QuantizerModule` below lists every member the code reads from a quantizer module, the optional ones with their
defaults. Consumers ask the module (`capability`, `owner`, `names_where`), never a list of quantizer names or a
layer's class name: adding a quantizer is its module, its table entry, its YAML and its tests.
Modules are imported on first use so that a CPU-only install without an optional backend still works.
`quantize_model` is the one driver: it times the work and measures every layer's error the same way.
"""

from __future__ import annotations

import functools
import importlib
import math
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qpeft_bench.config import ConfigError

# option name -> (module, knobs fixed by the option). nf4 and fp4 share bitsandbytes' 4-bit code path.
_TABLE: dict[str, tuple[str, dict]] = {
    "none": ("qpeft_bench.quant.none", {}),
    "nf4": ("qpeft_bench.quant.bnb4bit", {"quant_type": "nf4"}),
    "fp4": ("qpeft_bench.quant.bnb4bit", {"quant_type": "fp4"}),
    "rtn": ("qpeft_bench.quant.rtn", {}),
    "int8": ("qpeft_bench.quant.bnb8bit", {}),
    "gptq": ("qpeft_bench.quant.gptq", {}),
    "hqq": ("qpeft_bench.quant.hqq", {}),
    "smoothquant": ("qpeft_bench.quant.smoothquant", {}),
    "owq": ("qpeft_bench.quant.owq", {}),
    "qeft": ("qpeft_bench.quant.qeft", {}),
    "icq": ("qpeft_bench.quant.icq", {}),
}


class QuantizerModule(Protocol):
    """The members of a quantizer module (quant/<name>.py), as the code reads them.

    Required: Config, check_against_arch, quantize_linear, linear_storage, state_bytes, dequantize, layer_classes.
    Optional (OPTIONAL): the flags, `prepare`, `zero_points` and `set_zero_points`; a module that leaves one out has the default written here, which
    `capability` returns. tests/test_quant_protocol.py checks every module of the table against this class."""

    Config: type  # dataclass of its knobs (the `quant/` config group's keys)

    # --- optional flags: what the quantizer can do, asked by the recipe, plan mode, speed switches and adapters ---
    NEEDS_CALIBRATION: ClassVar[bool] = False  # it cannot run without calibration windows
    CUDA_ONLY: ClassVar[bool] = False  # its kernels exist only on CUDA
    FAMILIES: ClassVar[tuple[str, ...] | None] = None  # model families it supports (None: all); for model-level work
    FAMILIES_WHY: ClassVar[str] = ""  # why the others are not (said when one is refused)
    # every tensor of its layer follows Module.to(): a sweep may keep the base on the CPU between runs
    # (quantized_base._BASE_CACHE)
    PROCESS_REUSE: ClassVar[bool] = False
    # its layer returns the input's dtype, not autocast's (bitsandbytes): with fp32 norms the stream stays fp32
    # (plan mode's memory estimate, the fused LoRA function's output dtype)
    OUTPUT_FOLLOWS_INPUT_DTYPE: ClassVar[bool] = False
    # its layer computes exactly x @ dequantize(W)^T + bias, so the fused LoRA function may stand in for it
    # (fused_lora.py); layers that also round their activations compute something else
    FUSED_LORA_BASE: ClassVar[bool] = False
    # compile=auto compiles its runs on CUDA: measured to compile and train (results/bench/h200.md)
    COMPILE_TESTED: ClassVar[bool] = False
    # train.distributed=fsdp can shard it: its frozen weights are parameters, not buffers or state outside the
    # module, which FSDP would copy whole to every GPU
    FSDP_SHARDABLE: ClassVar[bool] = False
    # its layer rounds the activations too (Q(x) is not dequantize(W) x): no dense merge computes the same function
    QUANTIZES_ACTIVATIONS: ClassVar[bool] = False
    # peft's tuners wrap its layer themselves (nn.Linear, bitsandbytes, HQQ); the layers of the others reach peft's
    # LoRA through its custom-module mapping (adapters/lora.py)
    PEFT_WRAPS: ClassVar[bool] = False
    # its layer stores W = (code - zero) * scale per group of inputs and has `zero_points`/`set_zero_points`: a
    # group-constant update merges exactly into the zero points (QA-LoRA, adapters/qa_lora.py)
    GROUP_ZERO_POINTS: ClassVar[bool] = False
    # its layer keeps k input columns in 16 bits beside the quantized rest, `weak` (OWQ's format): peft=weak_columns
    # trains them, and QA-LoRA's zero-point merge would miss them
    WEAK_COLUMNS: ClassVar[bool] = False
    # its `prepare` works on one decoder block at a time: with calib.sequential the statistics of each block come
    # from the outputs of the blocks before it, already quantized (the GPTQ/OWQ/QEFT reference procedure)
    SEQUENTIAL: ClassVar[bool] = False

    def check_against_arch(self, cfg: Any, shapes: dict[str, tuple[int, int]]) -> None:
        """Sizes that must divide etc., from {module: (in, out)} alone; raises ConfigError."""

    def quantize_linear(self, linear: nn.Linear, cfg: Any, compute_dtype: str, device: str, stats: Any) -> nn.Module:
        """The quantized replacement of one linear layer (`stats`: what `prepare` returned for it, or None)."""

    def linear_storage(self, in_f: int, out_f: int, bias: bool, cfg: Any, dtype: str) -> tuple[int, int]:
        """(param_buffer_bytes, state_bytes): the storage format of one quantized linear, for plan mode."""

    def state_bytes(self, module: nn.Module) -> int:
        """Quantization state a real quantized layer keeps *outside* its parameters and buffers."""

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The weight the layer computes with (out, in, or a shape reshaping to it)."""

    def layer_classes(self) -> tuple[type, ...]:
        """The classes of the layers `quantize_linear` returns; `owner` finds the module of a layer through them.
        An optional backend that is not imported yet has no layer to own: return () without importing it."""

    @staticmethod
    def prepare(model: nn.Module, targets: list[str], cfg: Any, capture: Callable, device: str) -> dict:
        """Optional: work before `targets` are quantized (activation statistics, function-preserving transforms such
        as smoothing); returns {target: stats}. `capture(targets, reduce)` runs the calibration windows and returns
        {target: reduce folded over the target's inputs} (calibration.py's reducers). With SEQUENTIAL and
        calib.sequential it is called once per decoder block, with that block's targets, and `capture` runs that
        block on the outputs of the quantized blocks before it. Default: nothing to do."""
        return {}

    @staticmethod
    def prepare_global(model: nn.Module, targets: list[str], cfg: Any, capture: Callable, device: str) -> None:
        """Optional: model-level work that needs every layer's statistics before any layer is quantized (QEFT's
        global weak set and reordering); `capture` runs the unquantized model (block by block when sequential).
        Called before `prepare`. Default: nothing to do."""
        return None

    @staticmethod
    def zero_points(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Optional: (zeros, scales, group_size) of a layer storing W = (code - zero) * scale per group of
        `group_size` consecutive inputs of a row, both (out, in / group_size) in some layout, plainly (not
        quantized themselves); None where the layer has no such zero points (the default). A module that returns
        them also has `set_zero_points`."""
        return None

    @staticmethod
    def set_zero_points(module: nn.Module, zeros: torch.Tensor) -> None:
        """Optional, with `zero_points`: store new zero points of that shape and dtype (the exact merge of a
        group-constant update, adapters/base.merge_group_constant). Default: the layer has none to set."""
        raise NotImplementedError(f"{type(module).__name__} has no zero points to set")


REQUIRED = (
    "Config",
    "check_against_arch",
    "quantize_linear",
    "linear_storage",
    "state_bytes",
    "dequantize",
    "layer_classes",
)
OPTIONAL = (
    "NEEDS_CALIBRATION",
    "CUDA_ONLY",
    "FAMILIES",
    "FAMILIES_WHY",
    "PROCESS_REUSE",
    "OUTPUT_FOLLOWS_INPUT_DTYPE",
    "FUSED_LORA_BASE",
    "COMPILE_TESTED",
    "FSDP_SHARDABLE",
    "QUANTIZES_ACTIVATIONS",
    "PEFT_WRAPS",
    "GROUP_ZERO_POINTS",
    "WEAK_COLUMNS",
    "SEQUENTIAL",
    "prepare",
    "prepare_global",
    "zero_points",
    "set_zero_points",
)


def names() -> list[str]:
    return sorted(_TABLE)


def get(name: str) -> ModuleType:
    if name not in _TABLE:
        raise ConfigError(f"quant={name!r} is not implemented; available: {', '.join(names())}")
    return importlib.import_module(_TABLE[name][0])


def preset(name: str) -> dict:
    """Knobs that the option name fixes (e.g. quant_type for nf4/fp4); a config may not contradict them."""
    return dict(_TABLE[name][1])


def capability(quantizer: str | ModuleType | None, member: str):
    """An optional member of a quantizer (its name or its module), or the protocol's default where it has none;
    None (a layer no quantizer owns, see `owner`) has the defaults."""
    if member not in OPTIONAL:
        raise AttributeError(f"{member!r} is not an optional member of QuantizerModule; valid: {', '.join(OPTIONAL)}")
    qmod = get(quantizer) if isinstance(quantizer, str) else quantizer
    return getattr(qmod, member, getattr(QuantizerModule, member))


def names_where(member: str) -> tuple[str, ...]:
    """The option names whose quantizer has the flag `member` set, in table order."""
    return tuple(name for name in _TABLE if capability(name, member))


def modules() -> list[ModuleType]:
    """Every quantizer module once (nf4 and fp4 share one), in table order."""
    return [importlib.import_module(m) for m in dict.fromkeys(m for m, _ in _TABLE.values())]


def owner(layer: nn.Module) -> ModuleType | None:
    """The quantizer module whose layer `layer` is (a plain nn.Linear: quant "none"), or None.

    The most specific class wins: the first class in the layer's MRO that a module declares in `layer_classes`
    (bitsandbytes' layers subclass nn.Linear; weak-column layers subclass the group-wise format). Modules sharing
    a layer class share its format (rtn and gptq), and the first in table order answers."""
    return _owner_of(type(layer))


@functools.cache
def _owner_of(cls: type) -> ModuleType | None:
    # cached per class: a class can only exist once its backend is imported, so the answer never changes
    claims = [(qmod, qmod.layer_classes()) for qmod in modules()]
    for klass in cls.__mro__:
        for qmod, classes in claims:
            if klass in classes:
                return qmod
    return None


def needs_calibration(qmod: ModuleType) -> bool:
    return capability(qmod, "NEEDS_CALIBRATION")


def check_runnable(name: str, qmod: ModuleType, family: str, device: str | None, has_calibration: bool) -> None:
    """Combinations that cannot run, found before any model is loaded."""
    families = capability(qmod, "FAMILIES")
    if families is not None and family not in families:
        why = capability(qmod, "FAMILIES_WHY")
        raise ConfigError(
            f"quant={name} supports model families {', '.join(families)}{f' ({why})' if why else ''}; "
            f"this model is {family!r}"
        )
    if needs_calibration(qmod) and not has_calibration:
        raise ConfigError(
            f"quant={name} needs calibration data: use calib=finetune (the fine-tuning data) or "
            "calib=text calib.path=<local text file>, not calib=none"
        )
    if device is not None and capability(qmod, "CUDA_ONLY") and not device.startswith("cuda"):
        raise ConfigError(f"quant={name} runs only on CUDA; train.device resolves to {device!r}")


@torch.no_grad()
def quantize_model(
    name: str,
    model: nn.Module,
    targets: list[str],
    cfg,
    compute_dtype: str,
    device: str,
    windows: torch.Tensor | None = None,
    probe: torch.Tensor | None = None,
    progress: bool = False,
    fill=None,
    sequential: bool = False,
) -> dict:
    """Quantize `targets` of `model` in place with quantizer `name`; returns the record's `quant` section.

    `fill(target)`: for a model loaded layer by layer (models.empty_model, models.BlockLoader), puts the target's
    full-precision weights in place just before it is quantized (block by block: its block's, just before the block
    is calibrated), so only one layer (one block) is ever held unquantized. One-pass calibration needs the whole
    model and refuses it.

    `windows` (samples, seq_len) are the calibration token ids; `probe` a small batch of token ids on which each
    layer's output error is measured: || Q(x) - W x || / || W x || with x the layer's input (in one-pass mode: in the
    prepared unquantized model; block by block: with the blocks before it quantized, as the layer will see it) and
    Q(x) what the quantized layer really computes (activation quantization included).
    `sequential`: calibrate block by block (calib.sequential) where the quantizer can (its SEQUENTIAL flag).
    """
    qmod = get(name)
    if needs_calibration(qmod) and windows is None:
        raise ConfigError(f"quant={name} needs calibration windows")
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    walk = _blockwise if sequential and windows is not None and capability(qmod, "SEQUENTIAL") else _one_pass
    layers, times, stats_peak = walk(qmod, model, targets, cfg, compute_dtype, device, windows, probe, progress, fill)
    sync()
    return {
        "name": name,
        "quantize_time_s": times["quantize"],
        "calibration_time_s": times["calibration"],
        "sequential": walk is _blockwise,
        "calibration_stats_peak_bytes": stats_peak,
        "weight_rel_error": _mean(e["weight_rel_error"] for e in layers.values()),
        "output_rel_error": _mean(e["output_rel_error"] for e in layers.values()),
        "layers": layers,
    }


def _one_pass(qmod, model, targets, cfg, compute_dtype, device, windows, probe, progress, fill):
    """Statistics of every target from one pass of the unquantized model, all held, then every target quantized."""
    from qpeft_bench.calibration import capture_inputs, keep

    def capture(ts: list[str], reduce) -> dict:
        if windows is None:
            raise ConfigError(f"quant={qmod.__name__.rsplit('.', 1)[-1]} needs calibration windows")
        if fill is not None:  # the pass would run layers not yet read in
            raise ValueError(
                f"quant={qmod.__name__.rsplit('.', 1)[-1]} calibrates in one pass of the whole model: it cannot "
                "be calibrated while the model is brought in one block at a time (calib.load_by_block=false)"
            )
        return capture_inputs(model, ts, windows, reduce, device)

    t0 = time.perf_counter()
    capability(qmod, "prepare_global")(model, targets, cfg, capture, device)
    stats = capability(qmod, "prepare")(model, targets, cfg, capture, device)
    times = {"calibration": time.perf_counter() - t0, "quantize": 0.0}
    inputs = capture_inputs(model, targets, probe, keep, device) if probe is not None and fill is None else {}
    layers, times["quantize"] = _quantize_targets(
        qmod, model, _progress(targets, progress), cfg, compute_dtype, device, stats, inputs, fill
    )
    return layers, times, stats_bytes(stats)


def _blockwise(qmod, model, targets, cfg, compute_dtype, device, windows, probe, progress, fill):
    """The reference procedure: block after block, statistics on the outputs of the quantized blocks before."""
    from qpeft_bench import blocks
    from qpeft_bench.calibration import keep

    prefix, decoder = blocks.decoder_blocks(model)
    own = {i: [t for t in targets if t.startswith(f"{prefix}.{i}.")] for i in range(len(decoder))}
    stray = sorted(set(targets) - {t for ts in own.values() for t in ts})
    if stray:
        raise ValueError(f"targets outside the decoder blocks cannot be calibrated block by block: {stray[:3]}")
    t0 = time.perf_counter()
    if capability(qmod, "prepare_global") is not QuantizerModule.prepare_global:
        walk = _unquantized_walk(model, own, windows, device, fill)
        capability(qmod, "prepare_global")(model, targets, cfg, walk, device)
    hidden, kwargs = blocks.first_block_inputs(model, windows, device)
    times = {"calibration": time.perf_counter() - t0, "quantize": 0.0}
    n_probe = 0 if probe is None else probe.shape[0]
    layers, peak = {}, 0
    bar = _progress(targets, progress)
    for i, block in enumerate(decoder):
        ts = own[i]
        if fill is not None:
            for t in ts:
                fill(t)
        t0 = time.perf_counter()
        stats = capability(qmod, "prepare")(model, ts, cfg, blocks.block_capture(model, block, hidden, kwargs), device)
        peak = max(peak, stats_bytes(stats))
        times["calibration"] += time.perf_counter() - t0
        inputs = blocks.block_capture(model, block, hidden[:n_probe], kwargs)(ts, keep) if n_probe and ts else {}
        done, seconds = _quantize_targets(qmod, model, ts, cfg, compute_dtype, device, stats, inputs, None)
        times["quantize"] += seconds
        layers.update(done)
        del stats, inputs
        t0 = time.perf_counter()
        hidden = blocks.run_block(block, hidden, kwargs)
        times["calibration"] += time.perf_counter() - t0
        if hasattr(bar, "update"):
            bar.update(len(ts))
    if hasattr(bar, "close"):
        bar.close()
    return layers, times, peak


def _unquantized_walk(model, own: dict[int, list[str]], windows, device, fill) -> Callable:
    """capture(targets, reduce) over the unquantized model, one block at a time (only one block's share of the
    statistics is gathered per forward, the rest of the model is never run). `own`: each block's targets. With a
    by-block load (`fill`, models.BlockLoader) each block is read in for its turn and freed after it, so the walk
    too holds one block in full precision; the main walk reads it again."""
    from qpeft_bench import blocks

    def capture(ts: list[str], reduce) -> dict:
        prefix, decoder = blocks.decoder_blocks(model)
        hidden, kwargs = blocks.first_block_inputs(model, windows, device)
        states: dict = {}
        for i, block in enumerate(decoder):
            if fill is not None:
                for t in own[i]:
                    fill(t)
            mine = [t for t in ts if t.startswith(f"{prefix}.{i}.")]
            if mine:
                states.update(blocks.block_capture(model, block, hidden, kwargs)(mine, reduce))
            hidden = blocks.run_block(block, hidden, kwargs)
            if fill is not None:
                for t in own[i]:
                    fill.unload(t)
        return states

    return capture


def _quantize_targets(qmod, model, targets, cfg, compute_dtype, device, stats, inputs, fill) -> tuple[dict, float]:
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    layers, seconds = {}, 0.0
    for target in targets:
        old = model.get_submodule(target)
        if fill is not None:
            fill(target)
        weight = old.weight.detach().float()
        bias = None if old.bias is None else old.bias.detach().float()
        _check_finite(target, weight, bias)
        t0 = time.perf_counter()
        new = qmod.quantize_linear(old, cfg, compute_dtype, device, stats.get(target))
        sync()
        seconds += time.perf_counter() - t0
        model.set_submodule(target, new)
        del old
        layers[target] = layer_errors(weight, bias, new, qmod.dequantize(new), inputs.get(target), compute_dtype)
    return layers, seconds


def _check_finite(target: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    # A NaN or inf weight quantizes to codes and scales that hide it (NF4's absmax becomes NaN for the whole block,
    # GPTQ's Cholesky fails far from the cause): name the layer instead, before anything is written.
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{target}.{what} has {bad} NaN or infinite values of {t.numel()}: the checkpoint is corrupt or was "
                "saved from a diverged run; nothing was quantized from it"
            )


def stats_bytes(stats: dict) -> int:
    """Bytes of the distinct tensors in a `prepare` result (shared statistics counted once)."""
    seen: dict[int, int] = {}

    def visit(v):
        if isinstance(v, torch.Tensor):
            seen[id(v)] = v.numel() * v.element_size()
        elif isinstance(v, (tuple, list)):
            for x in v:
                visit(x)

    for v in stats.values():
        visit(v)
    return sum(seen.values())


def layer_errors(weight, bias, new: nn.Module, deq: torch.Tensor, x: torch.Tensor | None, compute_dtype: str) -> dict:
    from qpeft_bench.models import DTYPE

    deq = deq.float().reshape(weight.shape)
    out = {"weight_rel_error": float((deq - weight).norm() / weight.norm().clamp(min=1e-30)), "output_rel_error": None}
    if x is not None:
        reference = F.linear(x.float(), weight, bias)
        was_training = new.training
        new.eval()
        got = new(x.to(DTYPE[compute_dtype])).float()
        new.train(was_training)
        out["output_rel_error"] = float((got - reference).norm() / reference.norm().clamp(min=1e-30))
    return out


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return math.fsum(vals) / len(vals) if vals else None


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="quantize", unit="layer", leave=False)
