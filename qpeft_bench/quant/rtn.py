"""RTN: group-wise min-max round-to-nearest, with a scale and a zero point per group (or symmetric, zero point
fixed at mid-range), fitted and rounded as GPTQ's reference `--nearest` baseline does (quant/fit.py). No calibration
data; the baseline every other integer quantizer must beat."""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch

from qpeft_bench.models import DTYPE
from qpeft_bench.quant import fit
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
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (in code units) per (row, group) of an (out, in) weight, in fp32: GPTQ's min-max fit
    (quant/fit.py) applied to each group of `group_size` consecutive inputs."""
    out, n_in = weight.shape
    scale, zero = fit.minmax(weight.float().reshape(-1, group_size), bits, symmetric)
    return scale.reshape(out, n_in // group_size), zero.reshape(out, n_in // group_size)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """(out, in) weight -> integer codes, scales and zero points per group, all computed in fp32."""
    scale, zero = group_params(weight, bits, group_size, symmetric)
    w = weight.float().reshape(weight.shape[0], -1, group_size)
    codes = fit.encode(w, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
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
