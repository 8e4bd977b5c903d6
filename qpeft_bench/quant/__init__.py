"""Quantizers of the frozen base model: one module each, dispatched through a small table.

Every quantizer module provides:
  Config                                   dataclass of its knobs (the `quant/` config group's keys)
  check_against_arch(cfg, shapes)          sizes that must divide etc., from {module: (in, out)} alone
  quantize(model, targets, cfg, compute_dtype, device)
                                           replace the target linears in place with quantized ones
  linear_storage(in_f, out_f, bias, cfg, dtype) -> (param_buffer_bytes, state_bytes)
                                           the storage format of one quantized linear, for plan mode
  state_bytes(module) -> int               quantization state a real quantized module keeps *outside*
                                           its parameters and buffers (absmax, double-quant state, ...)
  dequantize(module) -> Tensor             the (out, in) weight the module computes with, for references
Modules are imported on first use so that a CPU-only install without an optional backend still works.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from qpeft_bench.config import ConfigError

# option name -> (module, knobs fixed by the option). nf4 and fp4 share bitsandbytes' 4-bit code path.
_TABLE: dict[str, tuple[str, dict]] = {
    "none": ("qpeft_bench.quant.none", {}),
    "nf4": ("qpeft_bench.quant.bnb4bit", {"quant_type": "nf4"}),
    "fp4": ("qpeft_bench.quant.bnb4bit", {"quant_type": "fp4"}),
    "hqq": ("qpeft_bench.quant.hqq", {}),
    "rtn": ("qpeft_bench.quant.rtn", {}),
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
