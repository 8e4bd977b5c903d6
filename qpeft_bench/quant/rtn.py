"""RTN: group-wise min-max round-to-nearest, with a scale and a zero point per group (or symmetric, zero point
fixed at mid-range). No calibration data; the baseline every other integer quantizer must beat."""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch

from qpeft_bench.models import DTYPE
from qpeft_bench.quant.qlinear import GroupQuantLinear, check_layout, storage_bytes

PROCESS_REUSE = True  # plain tensors only: the base can wait on the CPU between runs (quantized_base._BASE_CACHE)
FUSED_LORA_BASE = True
COMPILE_TESTED = True
GROUP_ZERO_POINTS = True  # zero_points below


@dataclass
class Config:
    bits: typing.Literal[2, 3, 4, 8] = 4
    group_size: int = 128  # consecutive input features sharing a scale and zero point
    symmetric: bool = False  # true: scale from max|w|, zero point at mid-range


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    check_layout(cfg.group_size, shapes)


def group_params(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, skip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (in code units) per (row, group) of an (out, in) weight, in fp32.

    `skip` (in,) bool marks columns left out of the min/max (weak columns kept in 16 bits elsewhere)."""
    w = weight.float()
    levels = 2**bits - 1
    if skip is not None and skip.any():
        keep = ~skip
        w_hi = torch.where(keep, w, torch.tensor(-torch.inf, device=w.device))
        w_lo = torch.where(keep, w, torch.tensor(torch.inf, device=w.device))
        hi = w_hi.reshape(w.shape[0], -1, group_size).amax(-1)
        lo = w_lo.reshape(w.shape[0], -1, group_size).amin(-1)
        hi, lo = hi.nan_to_num(0.0, 0.0, 0.0), lo.nan_to_num(0.0, 0.0, 0.0)  # a group of weak columns only
    else:
        grouped = w.reshape(w.shape[0], -1, group_size)
        hi, lo = grouped.amax(-1), grouped.amin(-1)
    if symmetric:
        scale = torch.maximum(hi.abs(), lo.abs()) / (levels / 2)
        zero = torch.full_like(scale, (levels + 1) / 2)
    else:
        scale = (hi - lo) / levels
        zero = torch.round(-lo / scale.clamp(min=1e-12))
    return scale.clamp(min=1e-12), zero  # constant groups: any scale reproduces them


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest code of w on the grid (code - zero) * scale, clamped to [0, 2^bits - 1]; shapes broadcast."""
    return torch.clamp(torch.round(w / scale + zero), 0, 2**bits - 1)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """(out, in) weight -> integer codes, scales and zero points per group, all computed in fp32."""
    scale, zero = group_params(weight, bits, group_size, symmetric)
    w = weight.float().reshape(weight.shape[0], -1, group_size)
    codes = encode(w, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return codes.reshape(weight.shape).to(torch.uint8), scale, zero


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats=None):
    codes, scale, zero = quantize_weight(old.weight.data, cfg.bits, cfg.group_size, cfg.symmetric)
    dtype = old.weight.dtype  # scales in the model's dtype, as the storage format says
    layer = GroupQuantLinear(
        old.in_features,
        old.out_features,
        cfg.bits,
        cfg.group_size,
        None if old.bias is None else old.bias.data,
        codes,
        scale.to(dtype),
        zero.to(dtype),
    )
    return layer.to(device)


def linear_storage(in_f: int, out_f: int, bias: bool, cfg: Config, dtype: str) -> tuple[int, int]:
    return storage_bytes(in_f, out_f, cfg.bits, cfg.group_size, DTYPE[dtype].itemsize, bias), 0


def dequantize(module) -> torch.Tensor:
    return module.dequantize()


def state_bytes(module) -> int:
    return 0  # everything is a buffer


def layer_classes() -> tuple[type, ...]:
    return (GroupQuantLinear,)


def zero_points(module) -> tuple[torch.Tensor, torch.Tensor, int]:
    return module.zeros, module.scales, module.group_size


def set_zero_points(module, zeros: torch.Tensor) -> None:
    module.zeros.copy_(zeros)
