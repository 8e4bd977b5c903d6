"""GPTQ/OPTQ (Frantar et al. 2023): quantize a weight column by column and push each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian H = 2/n sum x x^T of the layer's inputs on
calibration data. Our own torch code; the result is stored in the same `GroupQuantLinear` format as RTN (so the
two are directly comparable: same grid, same bytes).

Choices, and why:
- Hessians come from one pass of the *unquantized* model over the calibration windows (all layers at once),
  not from the block-by-block pass over already-quantized blocks of the reference code: one forward, no
  architecture-specific plumbing. It costs a little accuracy on deep models; the error probe in the record says
  how much the result is worth.
- Group scales and zero points are fixed up front from the original weights ("static groups"). They stay
  valid under activation order, where columns are visited in decreasing H_jj order and a group's columns are
  not contiguous in time; the storage layout stays the plain contiguous-group one.
- `keep` columns (OWQ/QEFT weak columns) are visited last and not rounded: they absorb the error feedback of
  every other column and are returned in full precision.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch

from qpeft_bench.calibration import capture_inputs, hessian
from qpeft_bench.config import ConfigError
from qpeft_bench.quant.qlinear import GroupQuantLinear, check_layout
from qpeft_bench.quant.rtn import (  # noqa: F401 - the same storage format as RTN: sizes, dequantization
    dequantize,
    encode,
    group_params,
    layer_classes,
    linear_storage,
    set_zero_points,
    state_bytes,
    zero_points,
)

PROCESS_REUSE = True  # plain tensors only: the base can wait on the CPU between runs (quantized_base._BASE_CACHE)
NEEDS_CALIBRATION = True
FUSED_LORA_BASE = True  # RTN's layer
GROUP_ZERO_POINTS = True  # RTN's layer: its zero points (quant.owner answers rtn for the layer)
LAZY_BLOCK = 128  # columns whose updates are applied to the rest of the matrix at once (GPTQ's lazy batching)


@dataclass
class Config:
    bits: typing.Literal[2, 3, 4, 8] = 4
    group_size: int = 128  # consecutive input features sharing a scale and zero point; must divide in_features
    damp_percent: float = 0.01  # added to H's diagonal, as a fraction of its mean: keeps the Cholesky stable
    act_order: bool = True  # visit columns in decreasing H_jj (the "desc_act" of GPTQ implementations)
    symmetric: bool = False

    def check(self, where: str) -> None:
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"{where}.damp_percent={self.damp_percent} must lie strictly between 0 and 1")


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    check_layout(cfg.group_size, shapes)


def layer_hessians(model, targets: list[str], windows: torch.Tensor, device: str) -> dict[str, torch.Tensor]:
    """{target: H = 2/n sum x x^T} over the calibration windows (layers fed the same input share one H)."""
    states = capture_inputs(model, targets, windows, hessian, device)
    out, done = {}, {}
    for name, state in states.items():
        if id(state) not in done:
            done[id(state)] = state[0].mul_(2.0 / state[1])
        out[name] = done[id(state)]
    return out


def prepare(model, targets: list[str], cfg: Config, windows: torch.Tensor, device: str) -> dict:
    return layer_hessians(model, targets, windows, device)


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    damp_percent: float,
    act_order: bool,
    symmetric: bool = False,
    keep: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
):
    """Quantize an (out, in) weight against Hessian H (in, in).

    Returns (codes uint8 (out, in), scale, zero (out, in / group_size), kept (out, n_keep) fp32 values of the
    `keep` columns in index order, or None). Scales are rounded to `scale_dtype` *before* rounding the weights,
    so the codes are optimal for the scales actually stored."""
    W = weight.detach().float().clone()
    H = H.float().clone()
    n_in = W.shape[1]
    keep_mask = torch.zeros(n_in, dtype=torch.bool, device=W.device)
    if keep is not None:
        keep_mask[keep] = True

    dead = torch.diagonal(H) == 0  # inputs that were always 0: nothing to preserve there
    H[dead, dead] = 1.0
    W[:, dead & ~keep_mask] = 0.0

    scale, zero = group_params(W, bits, group_size, symmetric, skip=keep_mask)
    scale, zero = scale.to(scale_dtype).float(), zero.to(scale_dtype).float()  # the values stored
    group_of = torch.arange(n_in, device=W.device) // group_size

    diag = torch.diagonal(H)
    order = torch.argsort(diag, descending=True) if act_order else torch.arange(n_in, device=W.device)
    order = torch.cat([order[~keep_mask[order]], order[keep_mask[order]]])  # kept columns last
    n_quant = int((~keep_mask).sum())
    W, H = W[:, order], H[order][:, order]
    H.diagonal().add_(damp_percent * torch.mean(torch.diagonal(H)))
    # Upper Cholesky factor of H^-1: row i holds the update weights of column i on the columns after it.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros_like(W)
    s_cols, z_cols = scale[:, group_of[order]], zero[:, group_of[order]]
    for i1 in range(0, n_quant, LAZY_BLOCK):
        i2 = min(i1 + LAZY_BLOCK, n_quant)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w, s, z = W1[:, i], s_cols[:, i1 + i], z_cols[:, i1 + i]
            c = encode(w, s, z, bits)
            codes[:, i1 + i] = c
            err = (w - (c - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]

    inverse = torch.argsort(order)
    codes = codes[:, inverse]
    kept = None
    if keep is not None:
        W = W[:, inverse]
        kept = W[:, keep]
        codes[:, keep] = zero[:, group_of[keep]].clamp(0, 2**bits - 1)  # unused codes: store the zero point
    return codes.to(torch.uint8), scale, zero, kept


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats: torch.Tensor | None):
    if stats is None:
        raise ValueError("gptq: no Hessian for this layer; the calibration pass did not reach it")
    dtype = old.weight.dtype
    codes, scale, zero, _ = gptq(
        old.weight.data.to(stats.device),
        stats,
        cfg.bits,
        cfg.group_size,
        cfg.damp_percent,
        cfg.act_order,
        cfg.symmetric,
        scale_dtype=dtype,
    )
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
