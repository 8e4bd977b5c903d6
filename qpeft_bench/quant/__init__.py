"""Quantizers of the frozen base model: one module each, dispatched through a small table.

Every quantizer module provides:
  Config                                   dataclass of its knobs (the `quant/` config group's keys)
  check_against_arch(cfg, shapes)          sizes that must divide etc., from {module: (in, out)} alone
  quantize_linear(linear, cfg, compute_dtype, device, stats) -> nn.Module
                                           the quantized replacement of one linear layer
  linear_storage(in_f, out_f, bias, cfg, dtype) -> (param_buffer_bytes, state_bytes)
                                           the storage format of one quantized linear, for plan mode
  state_bytes(module) -> int               quantization state a real quantized module keeps *outside*
                                           its parameters and buffers (absmax, double-quant state, ...)
  dequantize(module) -> Tensor             the (out, in) weight the module computes with, for references
and optionally:
  NEEDS_CALIBRATION = True                 it cannot run without calibration windows
  CUDA_ONLY = True                         its kernels exist only on CUDA
  FAMILIES = ("llama", ...)                model families it supports (a model-level transform needs this)
  prepare(model, targets, cfg, windows, device) -> {target: stats}
                                           model-level work before the layers are quantized: activation
                                           statistics, function-preserving transforms (smoothing, reordering)
Modules are imported on first use so that a CPU-only install without an optional backend still works.
`quantize_model` is the one driver: it times the work and measures every layer's error the same way.
"""

from __future__ import annotations

import importlib
import math
import time
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from qpeft_bench.config import ConfigError

# option name -> (module, knobs fixed by the option). nf4 and fp4 share bitsandbytes' 4-bit code path.
_TABLE: dict[str, tuple[str, dict]] = {
    "none": ("qpeft_bench.quant.none", {}),
    "nf4": ("qpeft_bench.quant.bnb4bit", {"quant_type": "nf4"}),
    "fp4": ("qpeft_bench.quant.bnb4bit", {"quant_type": "fp4"}),
    "hqq": ("qpeft_bench.quant.hqq", {}),
    "rtn": ("qpeft_bench.quant.rtn", {}),
    "int8": ("qpeft_bench.quant.bnb8bit", {}),
    "gptq": ("qpeft_bench.quant.gptq", {}),
    "smoothquant": ("qpeft_bench.quant.smoothquant", {}),
    "owq": ("qpeft_bench.quant.owq", {}),
    "qeft": ("qpeft_bench.quant.qeft", {}),
    "icq": ("qpeft_bench.quant.icq", {}),
}


def names() -> list[str]:
    return sorted(_TABLE)


def get(name: str) -> ModuleType:
    if name not in _TABLE:
        raise ConfigError(f"quant={name!r} is not implemented; available: {', '.join(names())}")
    return importlib.import_module(_TABLE[name][0])


def preset(name: str) -> dict:
    """Knobs that the option name fixes (e.g. quant_type for nf4/fp4); a config may not contradict them."""
    return dict(_TABLE[name][1])


def needs_calibration(qmod: ModuleType) -> bool:
    return getattr(qmod, "NEEDS_CALIBRATION", False)


def check_runnable(name: str, qmod: ModuleType, family: str, device: str | None, has_calibration: bool) -> None:
    """Combinations that cannot run, found before any model is loaded."""
    families = getattr(qmod, "FAMILIES", None)
    if families is not None and family not in families:
        raise ConfigError(f"quant={name} supports model families {', '.join(families)}; this model is {family!r}")
    if needs_calibration(qmod) and not has_calibration:
        raise ConfigError(
            f"quant={name} needs calibration data: use calib=finetune (the fine-tuning data) or "
            "calib=text calib.path=<local text file>, not calib=none"
        )
    if device is not None and getattr(qmod, "CUDA_ONLY", False) and not device.startswith("cuda"):
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
) -> dict:
    """Quantize `targets` of `model` in place with quantizer `name`; returns the record's `quant` section.

    `fill(target)`: for a model loaded layer by layer (models.empty_model), puts the target's full-precision
    weights in place just before it is quantized, so only one layer is ever held unquantized.

    `windows` (samples, seq_len) are the calibration token ids; `probe` a small batch of token ids on which each
    layer's output error is measured: || Q(x) - W x || / || W x || with x the layer's input in the (prepared)
    unquantized model and Q(x) what the quantized layer really computes (activation quantization included).
    """
    qmod = get(name)
    if needs_calibration(qmod) and windows is None:
        raise ConfigError(f"quant={name} needs calibration windows")
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    stats = qmod.prepare(model, targets, cfg, windows, device) if hasattr(qmod, "prepare") else {}
    sync()
    calibration_s = time.perf_counter() - t0

    from qpeft_bench.calibration import capture_inputs, keep

    inputs = capture_inputs(model, targets, probe, keep, device) if probe is not None else {}
    layers, quantize_s = {}, 0.0
    for target in _progress(targets, progress):
        old = model.get_submodule(target)
        if fill is not None:
            fill(target)
        weight = old.weight.detach().float()
        bias = None if old.bias is None else old.bias.detach().float()
        t0 = time.perf_counter()
        new = qmod.quantize_linear(old, cfg, compute_dtype, device, stats.get(target))
        sync()
        quantize_s += time.perf_counter() - t0
        model.set_submodule(target, new)
        del old
        layers[target] = layer_errors(weight, bias, new, qmod.dequantize(new), inputs.get(target), compute_dtype)
    return {
        "name": name,
        "quantize_time_s": quantize_s,
        "calibration_time_s": calibration_s,
        "weight_rel_error": _mean(e["weight_rel_error"] for e in layers.values()),
        "output_rel_error": _mean(e["output_rel_error"] for e in layers.values()),
        "layers": layers,
    }


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
