"""RTN: group-wise min-max round-to-nearest, with a scale and a zero point per group (or symmetric, zero point
fixed at mid-range). No calibration data; the baseline every other integer quantizer must beat."""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch

from qpeft_bench.config import ConfigError
from qpeft_bench.models import DTYPE
from qpeft_bench.quant.qlinear import GroupQuantLinear


@dataclass
class Config:
    bits: typing.Literal[2, 4, 8] = 4  # 3-bit needs a packing across bytes: not implemented yet
    group_size: int = 128  # consecutive input features sharing a scale and zero point
    symmetric: bool = False  # true: scale from max|w|, zero point at mid-range


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    if cfg.group_size <= 0:
        raise ConfigError(f"quant.group_size={cfg.group_size} must be > 0")
    for name, (in_f, out_f) in shapes.items():
        if in_f % cfg.group_size:
            raise ConfigError(f"quant.group_size={cfg.group_size} does not divide in_features={in_f} of {name} "
                              f"({in_f} -> {out_f}); choose a divisor of {in_f}")


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """(out, in) weight -> integer codes, scales and zero points per group, all computed in fp32."""
    w = weight.float().reshape(weight.shape[0], -1, group_size)
    levels = 2**bits - 1
    if symmetric:
        scale = w.abs().amax(-1) / (levels / 2)
        zero = torch.full_like(scale, (levels + 1) / 2)
    else:
        lo, hi = w.amin(-1), w.amax(-1)
        scale = (hi - lo) / levels
        zero = torch.round(-lo / scale.clamp(min=1e-12))
    scale = scale.clamp(min=1e-12)  # constant groups: any scale reproduces them
    codes = torch.clamp(torch.round(w / scale.unsqueeze(-1) + zero.unsqueeze(-1)), 0, levels)
    return codes.reshape(weight.shape).to(torch.uint8), scale, zero


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats=None):
    codes, scale, zero = quantize_weight(old.weight.data, cfg.bits, cfg.group_size, cfg.symmetric)
    dtype = old.weight.dtype  # scales in the model's dtype, as the storage format says
    layer = GroupQuantLinear(old.in_features, old.out_features, cfg.bits, cfg.group_size,
                             None if old.bias is None else old.bias.data, codes, scale.to(dtype), zero.to(dtype))
    return layer.to(device)


def linear_storage(in_f: int, out_f: int, bias: bool, cfg: Config, dtype: str) -> tuple[int, int]:
    elem = torch.tensor([], dtype=DTYPE[dtype]).element_size()
    groups = in_f * out_f // cfg.group_size
    return in_f * out_f * cfg.bits // 8 + 2 * groups * elem + (out_f * elem if bias else 0), 0


def dequantize(module) -> torch.Tensor:
    return module.dequantize()


def state_bytes(module) -> int:
    return 0  # everything is a buffer
