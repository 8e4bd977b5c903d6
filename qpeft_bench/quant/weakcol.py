"""Weak columns (OWQ, QEFT): the k most sensitive input columns of a weight stay in 16 bits, the rest is stored
group-wise in `bits` bits. One layer class and one config for both methods; they differ in how the columns are
chosen (owq.py: per layer; qeft.py: one global set with offline reordering).

Storage of one layer, as the references quantize it (xvyaward/owq `owq/recon.py`, xvyaward/qeft `qeft/recon.py`
`fasterquant_reorder`): the other in - k columns, in input order, form "compact" groups of `group_size` columns
(the weak columns take no place in them; the last group may be short). Their codes are packed densely (padded to
whole groups and packing units), a scale and a zero point per group in the model's dtype; the weak columns are an
(out, k) 16-bit parameter and their indices k int32. The weak columns are a frozen parameter so that weak-column
fine-tuning (QEFT/OWQ tuning) can train exactly them.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qpeft_bench.config import ConfigError
from qpeft_bench.models import DTYPE
from qpeft_bench.quant import fit
from qpeft_bench.quant.qlinear import PACK_WIDTH, GroupQuantLinear, check_layout, storage_bytes

INDEX_BYTES = 4  # int32 column indices
SCORE_GRID = 40  # the MSE fit's grid when scoring columns and fitting groups (the references' num=40)


@dataclass
class Config:
    bits: typing.Literal[2, 3, 4, 8] = 4
    k: int = 8  # weak columns per layer, kept in the model's 16-bit dtype
    group_size: int = 128  # columns of the quantized rest sharing a scale and zero point; must divide in_features
    damp_percent: float = 0.01  # GPTQ damping of the Hessian diagonal (fraction of its mean)
    tuning: typing.Literal["mse", "minmax"] = "mse"  # group parameter fit (reference: --tuning mse)
    score_with_error: bool = True  # weak columns by H_jj * ||dW_j||^2 (reference); false: H_jj (--no_frob_norm)
    act_order: bool = False  # visit columns in decreasing score (reference: --act-order, off); needs static_groups
    static_groups: bool = False  # ours: fit every group up front from the original weights
    round_scales_first: bool = False  # ours: round scales to the model dtype before choosing codes

    def check(self, where: str) -> None:
        from qpeft_bench.quant.gptq import check_order

        if self.k < 0:
            raise ConfigError(f"{where}.k={self.k} must be >= 0")
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"{where}.damp_percent={self.damp_percent} must lie strictly between 0 and 1")
        check_order(self, where)


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    check_layout(cfg.group_size, shapes)
    for name, (in_f, out_f) in shapes.items():
        if cfg.k >= in_f:  # at least one column must be quantized
            raise ConfigError(
                f"quant.k={cfg.k} weak columns leave no column to quantize in {name} ({in_f} -> {out_f}); "
                f"choose k < {in_f}"
            )


def stored_width(n_rest: int, group_size: int) -> int:
    """Codes stored per row for `n_rest` quantized columns: whole groups, whole packing units."""
    unit = math.lcm(group_size, PACK_WIDTH)
    return max(unit, -(-n_rest // unit) * unit)


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
        """`codes` (out, in - k) of the other columns in input order; `scales`, `zeros` (out, compact groups)."""
        n_rest = in_features - weak_idx.numel()
        width = stored_width(n_rest, group_size)
        pad = width // group_size - scales.shape[1]
        codes = F.pad(codes, (0, width - n_rest))
        scales = F.pad(scales, (0, pad), value=1.0)
        zeros = F.pad(zeros, (0, pad))
        super().__init__(width, out_features, bits, group_size, bias, codes, scales, zeros)
        self.in_features = in_features
        self.weak = nn.Parameter(weak, requires_grad=False)  # (out, k) in 16 bits
        self.register_buffer("weak_idx", weak_idx.to(torch.int32))
        # QEFT's reordered layers hold their weak columns first: a concatenation, no scatter
        self.contiguous = bool(torch.equal(weak_idx.cpu(), torch.arange(weak_idx.numel())))

    def _rest_idx(self) -> torch.Tensor:
        rest = torch.ones(self.in_features, dtype=torch.bool, device=self.weak_idx.device)
        rest[self.weak_idx.long()] = False
        return rest.nonzero().squeeze(1)

    def _assemble(self, weak: torch.Tensor) -> torch.Tensor:
        k = self.weak_idx.numel()
        rest = super().dequantize()[:, : self.in_features - k]
        weak = weak.to(rest.dtype)
        if self.contiguous:
            return torch.cat([weak, rest], dim=1)
        full = torch.zeros(self.out_features, self.in_features, dtype=rest.dtype, device=rest.device)
        full = full.index_copy(1, self._rest_idx(), rest)
        return full.index_copy(1, self.weak_idx.long(), weak)  # out of place: gradients reach self.weak

    def dequantize(self) -> torch.Tensor:
        return self._assemble(self.weak)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        k = self.weak_idx.numel()
        if k == 0 or not (self.weak.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, self.dequantize().to(x.dtype), bias)
        # Training the weak columns (peft=weak_columns): x W^T = x_rest W_rest^T + x_weak weak^T. Through the whole
        # dequantized weight, backward would form the full (out x in) weight gradient, a GEMM as large as the
        # forward's, to keep k columns of it; here the frozen part needs no weight gradient and the weak columns'
        # is dy^T x_weak (out x k).
        rest = self._assemble(torch.zeros_like(self.weak.detach()))
        x_weak = x[..., :k] if self.contiguous else x.index_select(-1, self.weak_idx.long())
        return F.linear(x, rest.to(x.dtype), bias) + F.linear(x_weak, self.weak.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, "
            f"weak_columns={self.weak_idx.numel()}, contiguous={self.contiguous}"
        )


def group_fit(cfg: Config, num: int = SCORE_GRID):
    return lambda x: fit.fit(x, cfg.bits, cfg.tuning, num)


def column_error(weight: torch.Tensor, cfg: Config) -> torch.Tensor:
    """||W_j - Q(W)_j||^2 per input column, Q a per-row (whole-row) fit with the configured tuning: the error
    term of the references' weak-column score (their `frob_norm`, one temporary quantizer over each whole row)."""
    W = weight.float()
    scale, zero = group_fit(cfg)(W)
    scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    deq = scale * (fit.encode(W, scale, zero, cfg.bits) - zero)
    return (W - deq).pow(2).sum(0)


def scores(weight: torch.Tensor, diag: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The references' per-column sensitivity from the Hessian's diagonal: H_jj * ||dW_j||^2 (score_with_error),
    else H_jj."""
    return diag * column_error(weight.to(diag.device), cfg) if cfg.score_with_error else diag.clone()


def processing_order(n_in: int, weak: torch.Tensor, score: torch.Tensor | None, act_order: bool) -> torch.Tensor:
    """The references' column order: the others (input order, or decreasing score with act_order), then the weak
    columns in the order given."""
    if act_order:
        desc = torch.argsort(score, descending=True)
        keep = torch.ones(n_in, dtype=torch.bool, device=desc.device)
        keep[weak] = False
        return torch.cat([desc[keep[desc]], weak])
    rest = torch.ones(n_in, dtype=torch.bool, device=weak.device)
    rest[weak] = False
    return torch.cat([torch.arange(n_in, device=weak.device)[rest], weak])


def quantize_with_weak_columns(
    old: nn.Linear, H: torch.Tensor, weak_idx: torch.Tensor, cfg: Config, device: str, score: torch.Tensor | None = None
) -> WeakColumnLinear:
    """GPTQ over the other columns with the weak ones visited last, in the order given (they absorb the error
    feedback). `score` orders the others under act_order."""
    from qpeft_bench.quant.gptq import gptq

    dtype = old.weight.dtype
    weak_idx = weak_idx.to(H.device)
    if cfg.act_order and score is None:
        score = torch.diagonal(H)
    order = processing_order(old.in_features, weak_idx, score, cfg.act_order)
    codes, scale, zero, kept = gptq(
        old.weight.data.to(H.device),
        H,
        cfg.bits,
        cfg.group_size,
        cfg.damp_percent,
        group_fit(cfg),
        order=order,
        n_quant=old.in_features - weak_idx.numel(),
        static_groups=cfg.static_groups,
        scale_dtype=dtype if cfg.round_scales_first else None,
    )
    if kept is None:
        kept = torch.zeros(old.out_features, 0, device=H.device)
    return weak_layer(old, cfg, codes, scale, zero, kept, weak_idx, device)


def weak_layer(old, cfg: Config, codes, scale, zero, kept, weak_idx, device: str) -> WeakColumnLinear:
    dtype = old.weight.dtype
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
    width = stored_width(in_f - cfg.k, cfg.group_size)
    return storage_bytes(width, out_f, cfg.bits, cfg.group_size, elem, bias) + cfg.k * (out_f * elem + INDEX_BYTES), 0


def dequantize(module) -> torch.Tensor:
    return module.dequantize()


def state_bytes(module) -> int:
    return 0


def layer_classes() -> tuple[type, ...]:
    return (WeakColumnLinear,)
