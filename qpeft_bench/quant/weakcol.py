"""Weak columns (OWQ, QEFT): the k most sensitive input columns of a weight stay in 16 bits, the rest is stored
group-wise in `bits` bits. One layer class and one config for both methods; they differ in how the columns are
chosen (owq.py: per layer; qeft.py: one global set with offline reordering).

Storage of one layer: the `GroupQuantLinear` format over all in_features (the weak columns' codes are unused and
hold the zero point: keeping the code grid whole keeps every group the same size and costs k * out * bits / 8
bytes), the weak columns as an (out, k) 16-bit parameter, and their indices as k int32. The weak columns are a
frozen parameter so that weak-column fine-tuning (QEFT/OWQ tuning) can train exactly them.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qpeft_bench.config import ConfigError
from qpeft_bench.models import DTYPE
from qpeft_bench.quant.qlinear import GroupQuantLinear, check_layout, storage_bytes

INDEX_BYTES = 4  # int32 column indices


@dataclass
class Config:
    bits: typing.Literal[2, 3, 4, 8] = 4
    k: int = 8  # weak columns per layer, kept in the model's 16-bit dtype
    group_size: int = 128  # consecutive input features sharing a scale and zero point; must divide in_features
    damp_percent: float = 0.01  # GPTQ damping of the Hessian diagonal (fraction of its mean)
    act_order: bool = True  # GPTQ column order: decreasing Hessian diagonal

    def check(self, where: str) -> None:
        if self.k < 0:
            raise ConfigError(f"{where}.k={self.k} must be >= 0")
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"{where}.damp_percent={self.damp_percent} must lie strictly between 0 and 1")


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    check_layout(cfg.group_size, shapes)
    for name, (in_f, out_f) in shapes.items():
        if cfg.k > in_f:
            raise ConfigError(
                f"quant.k={cfg.k} weak columns exceed in_features={in_f} of {name} ({in_f} -> {out_f}); "
                f"choose k <= {in_f}"
            )


class WeakColumnLinear(GroupQuantLinear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        weak: torch.Tensor,
        weak_idx: torch.Tensor,
    ):
        super().__init__(in_features, out_features, bits, group_size, bias, codes, scales, zeros)
        self.weak = nn.Parameter(weak, requires_grad=False)  # (out, k) in 16 bits
        self.register_buffer("weak_idx", weak_idx.to(torch.int32))
        # QEFT's reordered layers hold their weak columns first: a slice, no gather
        self.contiguous = bool(torch.equal(weak_idx.cpu(), torch.arange(weak_idx.numel())))

    def dequantize(self) -> torch.Tensor:
        weight = super().dequantize()
        k = self.weak_idx.numel()
        if k == 0:
            return weight
        weak = self.weak.to(weight.dtype)
        if self.contiguous:
            return torch.cat([weak, weight[:, k:]], dim=1)
        return weight.index_copy(1, self.weak_idx.long(), weak)  # out of place: gradients reach self.weak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        k = self.weak_idx.numel()
        if k == 0 or not (self.weak.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, self.dequantize().to(x.dtype), bias)
        # Training the weak columns (peft=weak_columns): x W^T = x_rest W_rest^T + x_weak weak^T. Through the whole
        # dequantized weight, backward would form the full (out x in) weight gradient, a GEMM as large as the
        # forward's, to keep k columns of it; here the frozen part needs no weight gradient and the weak columns'
        # is dy^T x_weak (out x k).
        rest = super().dequantize()
        if self.contiguous:
            rest[:, :k] = 0
            x_weak = x[..., :k]
        else:
            rest.index_fill_(1, self.weak_idx.long(), 0)
            x_weak = x.index_select(-1, self.weak_idx.long())
        return F.linear(x, rest.to(x.dtype), bias) + F.linear(x_weak, self.weak.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weak_columns={self.weak_idx.numel()}, contiguous={self.contiguous}"


def quantize_with_weak_columns(
    old: nn.Linear, H: torch.Tensor, weak_idx: torch.Tensor, cfg: Config, device: str
) -> WeakColumnLinear:
    """GPTQ over the other columns with the weak ones visited last (they absorb the error feedback)."""
    from qpeft_bench.quant.gptq import gptq

    dtype = old.weight.dtype
    weak_idx = weak_idx.to(H.device).sort().values
    codes, scale, zero, kept = gptq(
        old.weight.data.to(H.device),
        H,
        cfg.bits,
        cfg.group_size,
        cfg.damp_percent,
        cfg.act_order,
        keep=weak_idx,
        scale_dtype=dtype,
    )
    layer = WeakColumnLinear(
        old.in_features,
        old.out_features,
        cfg.bits,
        cfg.group_size,
        None if old.bias is None else old.bias.data,
        codes,
        scale.to(dtype),
        zero.to(dtype),
        kept.to(dtype),
        weak_idx,
    )
    return layer.to(device)


def linear_storage(in_f: int, out_f: int, bias: bool, cfg: Config, dtype: str) -> tuple[int, int]:
    elem = DTYPE[dtype].itemsize
    return storage_bytes(in_f, out_f, cfg.bits, cfg.group_size, elem, bias) + cfg.k * (out_f * elem + INDEX_BYTES), 0


def dequantize(module) -> torch.Tensor:
    return module.dequantize()


def state_bytes(module) -> int:
    return 0


def layer_classes() -> tuple[type, ...]:
    return (WeakColumnLinear,)
