"""HQQ (half-quadratic quantization) through the `hqq` package's own `HQQLinear`.

transformers 5.x cannot load `HqqConfig` on these machines ("not available yet"), so we never route HQQ
through `from_pretrained`: the loaded model's target linears are replaced by `HQQLinear` in place. HQQ keeps a
scale and a zero point per group in `meta`, outside parameters and buffers: `get_memory_footprint()` misses
them (0.5 bit per weight at group size 64 in bf16), our `quant_state_bytes` counts them.
"""

from __future__ import annotations

import math
import sys
import typing
from dataclasses import dataclass

import torch

from qpeft_bench.config import ConfigError
from qpeft_bench.models import DTYPE

# hqq's packings: codes per storage element and its size in bytes (3-bit packs ten codes into an int32).
PACKING = {1: (8, 1), 2: (4, 1), 3: (10, 4), 4: (2, 1), 8: (1, 1)}
FUSED_LORA_BASE = True
COMPILE_TESTED = True
PEFT_WRAPS = True  # peft has its own layer for it
GROUP_ZERO_POINTS = True  # zero_points below (axis=1 groups run along the inputs)


@dataclass
class Config:
    nbits: typing.Literal[1, 2, 3, 4, 8] = 4
    group_size: int = 64  # weights sharing one scale and zero point
    axis: typing.Literal[0, 1] = 1  # 1: groups run along the input dimension (hqq's recommended setting)


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    if cfg.group_size <= 0:
        raise ConfigError(f"quant.group_size={cfg.group_size} must be > 0")
    for name, (in_f, out_f) in shapes.items():
        size, what = (in_f, "in_features") if cfg.axis == 1 else (out_f, "out_features")
        if size % cfg.group_size:
            raise ConfigError(
                f"quant.group_size={cfg.group_size} does not divide {what}={size} of {name} "
                f"({in_f} -> {out_f}) with quant.axis={cfg.axis}; choose a divisor of {size}"
            )


def _quant_config(cfg: Config) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=cfg.nbits, group_size=cfg.group_size, axis=cfg.axis)


def prepare(model, targets: list[str], cfg: Config, capture, device: str) -> dict:
    # peft's prepare_model_for_kbit_training only turns gradient checkpointing on for hqq-patched models
    # that say so (docs/design.md §7).
    model.hqq_quantized = True
    return {}


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats=None):
    from hqq.core.quantize import HQQLinear

    return HQQLinear(
        old, quant_config=_quant_config(cfg), compute_dtype=DTYPE[compute_dtype], device=device, del_orig=True
    )


def linear_storage(in_f: int, out_f: int, bias: bool, cfg: Config, dtype: str) -> tuple[int, int]:
    n = in_f * out_f
    groups = n // cfg.group_size
    per, itemsize = PACKING[cfg.nbits]
    rows, cols = (groups, cfg.group_size) if cfg.axis == 1 else (cfg.group_size, groups)
    weight = math.ceil(rows / per) * cols * itemsize  # hqq packs along the first dimension
    elem = torch.tensor([], dtype=DTYPE[dtype]).element_size()
    # scale and zero per group in the compute dtype; hqq keeps the bias outside parameters too
    state = 2 * groups * elem + (out_f * elem if bias else 0)
    return weight, state


def dequantize(module) -> torch.Tensor:
    return module.dequantize()


def state_bytes(module) -> int:
    meta = getattr(module, "meta", None) or {}
    total = sum(v.numel() * v.element_size() for v in meta.values() if isinstance(v, torch.Tensor))
    registered = {id(t) for t in (*module.parameters(), *module.buffers())}
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and id(bias) not in registered:
        total += bias.numel() * bias.element_size()
    return total


def zero_points(module) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Groups along the input (axis=1), scales and zero points stored plainly (not quantized, not offloaded):
    W = (W_q - zero) * scale over the rows of the weight flattened into (out * in / group_size, group_size)."""
    meta = getattr(module, "meta", None)
    plain = isinstance(meta, dict) and "zero" in meta and "scale" in meta
    if plain and meta.get("axis") == 1 and not meta.get("quant_zero") and not meta.get("quant_scale"):
        return meta["zero"], meta["scale"], meta["group_size"]
    return None


def set_zero_points(module, zeros: torch.Tensor) -> None:
    module.meta["zero"] = zeros  # hqq made its meta tensors under inference_mode, which forbids in-place updates


def layer_classes() -> tuple[type, ...]:
    quantize = sys.modules.get("hqq.core.quantize")  # not imported: no HQQLinear exists to own
    return () if quantize is None else (quantize.HQQLinear,)
