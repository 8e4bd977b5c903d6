"""GPTQ/OPTQ (Frantar et al. 2023): quantize a weight column by column and push each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian H = 2/n sum x x^T of the layer's inputs on
calibration data. Our own torch code, restating IST-DASLab/gptq `gptq.py` (`fasterquant`) so that on the same
weight and Hessian it gives the same codes bit for bit (docs/fidelity.md); stored in the same `GroupQuantLinear`
format as RTN (same grid, same bytes).

As the reference runs by default:
- Hessians come block by block: each decoder block is calibrated on the outputs of the blocks before it, already
  quantized (calib.sequential, calibration.py); calib.sequential=false takes one pass of the unquantized model.
- Dynamic groups: a group's scale and zero point are fitted (min-max, quant/fit.py) when the sweep reaches its
  first column, from the weights as the error feedback of the columns before has left them.
- Columns in input order; act_order=true visits them in decreasing H_jj (the reference's `--act-order`), which
  with dynamic groups would put non-contiguous columns into a group: the storage format needs static groups then.
Opt-in deviations: static_groups=true fits every group up front from the original weights (the reference's
`--static-groups`); round_scales_first=true rounds scales to the model dtype before choosing codes.
`gptq` below also serves OWQ/QEFT: columns it keeps (weak columns) come last in the processing order, are not
rounded, and absorb the error feedback of every other column.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qpeft_bench.calibration import hessian
from qpeft_bench.config import ConfigError
from qpeft_bench.quant import fit
from qpeft_bench.quant.qlinear import GroupQuantLinear, check_layout
from qpeft_bench.quant.rtn import (  # noqa: F401 - the same storage format as RTN: sizes, dequantization
    dequantize,
    layer_classes,
    linear_storage,
    set_zero_points,
    state_bytes,
    zero_points,
)

PROCESS_REUSE = True  # plain tensors only: the base can wait on the CPU between runs (quantized_base._BASE_CACHE)
NEEDS_CALIBRATION = True
SEQUENTIAL = True  # the reference calibrates block by block on the quantized blocks' outputs
FUSED_LORA_BASE = True  # RTN's layer
GROUP_ZERO_POINTS = True  # RTN's layer: its zero points (quant.owner answers rtn for the layer)
LAZY_BLOCK = 128  # columns whose updates are applied to the rest of the matrix at once (GPTQ's lazy batching)


@dataclass
class Config:
    bits: typing.Literal[2, 3, 4, 8] = 4
    group_size: int = 128  # consecutive input features sharing a scale and zero point; must divide in_features
    damp_percent: float = 0.01  # added to H's diagonal, as a fraction of its mean: keeps the Cholesky stable
    act_order: bool = False  # visit columns in decreasing H_jj (reference: --act-order, off by default)
    static_groups: bool = False  # fit every group's parameters up front from the original weights (--static-groups)
    round_scales_first: bool = False  # ours: round scales to the model dtype before choosing codes
    symmetric: bool = False

    def check(self, where: str) -> None:
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"{where}.damp_percent={self.damp_percent} must lie strictly between 0 and 1")
        check_order(self, where)


def check_order(cfg, where: str) -> None:
    """act_order with dynamic groups puts columns far apart into one group; the storage format keeps each group's
    columns contiguous, so that combination is refused rather than stored as something else."""
    if cfg.act_order and not cfg.static_groups:
        raise ConfigError(
            f"{where}.act_order=true with dynamic groups makes groups of non-contiguous columns, which the storage "
            f"format cannot hold; set {where}.static_groups=true (the reference's --static-groups) or "
            f"{where}.act_order=false"
        )


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    check_layout(cfg.group_size, shapes)


def finish_hessians(states: dict) -> dict[str, torch.Tensor]:
    """{target: H = 2/n sum x x^T} from calibration.hessian's running sums (layers fed the same input share one H,
    scaled once)."""
    out, done = {}, {}
    for name, state in states.items():
        if id(state) not in done:
            done[id(state)] = state[0].mul_(2.0 / state[1])
        out[name] = done[id(state)]
    return out


def prepare(model, targets: list[str], cfg: Config, capture, device: str) -> dict:
    return finish_hessians(capture(targets, hessian))


def inverse_factor(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1: row i holds the update weights of column i on the columns after it."""
    H = H.clone()
    H.diagonal().add_(damp_percent * torch.mean(torch.diagonal(H)))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def chunks(x: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    return [x[:, i : i + group_size] for i in range(0, x.shape[1], group_size)]


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    damp_percent: float,
    fit_group: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    order: torch.Tensor | None = None,
    n_quant: int | None = None,
    static_groups: bool = False,
    scale_dtype: torch.dtype | None = None,
):
    """Quantize an (out, in) weight against Hessian H (in, in).

    `order`: the processing order of the input columns (default: input order); its first `n_quant` columns are
    quantized, the others kept (they come last and absorb the error feedback). Groups are runs of `group_size` of
    the quantized columns in input order ("compact" groups: kept columns take no place in them, the last may be
    short); with dynamic groups the quantized columns must be visited in input order. `fit_group(x)` -> (scale,
    zero) per row of a group's weights. `scale_dtype`: round scales to it before choosing codes.

    Returns (codes (out, n_quant) uint8 in input order of the quantized columns, scale and zero (out, n_groups)
    fp32, kept (out, in - n_quant) fp32 in processing order, or None)."""
    W = weight.detach().float().clone()
    n_in = W.shape[1]
    order = torch.arange(n_in, device=W.device) if order is None else order.to(W.device)
    n_quant = n_in if n_quant is None else n_quant
    quant_cols = order[:n_quant]
    in_order = bool((quant_cols[1:] > quant_cols[:-1]).all())
    if not static_groups and not in_order:
        raise ValueError("dynamic groups need the quantized columns visited in input order")

    W, H = W[:, order], H.float()[order][:, order]
    dead = torch.diagonal(H) == 0  # inputs that were always 0: nothing to preserve there
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    def rounded(s, z):
        if scale_dtype is None:
            return s, z
        return s.to(scale_dtype).float(), z.to(scale_dtype).float()

    # static groups: fitted now, on the compact (input-order) run of the quantized columns
    rank = torch.empty(n_quant, dtype=torch.long, device=W.device)  # processing position -> compact position
    rank[torch.argsort(quant_cols)] = torch.arange(n_quant, device=W.device)
    scales, zeros = [], []
    if static_groups:
        compact = W[:, :n_quant][:, torch.argsort(quant_cols)]
        for x in chunks(compact, group_size):
            s, z = rounded(*fit_group(x))
            scales.append(s)
            zeros.append(z)
        s_all, z_all = torch.stack(scales, 1), torch.stack(zeros, 1)
        group_of = rank // group_size

    Hinv = inverse_factor(H, damp_percent)
    codes = torch.zeros(W.shape[0], n_quant, device=W.device)
    s = z = None
    for i1 in range(0, n_quant, LAZY_BLOCK):
        i2 = min(i1 + LAZY_BLOCK, n_quant)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            p = i1 + i
            if static_groups:
                s, z = s_all[:, group_of[p]], z_all[:, group_of[p]]
            elif p % group_size == 0:  # fitted from W as the blocks before left it (not this block's updates)
                s, z = rounded(*fit_group(W[:, p : min(p + group_size, n_quant)]))
                scales.append(s)
                zeros.append(z)
            w = W1[:, i]
            c = fit.encode(w, s, z, bits)
            codes[:, p] = c
            err = (w - s * (c - z)) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        W[:, i2:] -= err1.matmul(Hinv[i1:i2, i2:])

    codes = codes[:, torch.argsort(quant_cols)]  # input order of the quantized columns
    kept = W[:, n_quant:] if n_quant < n_in else None
    return codes.to(torch.uint8), torch.stack(scales, 1), torch.stack(zeros, 1), kept


def group_fit(cfg) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return lambda x: fit.minmax(x, cfg.bits, cfg.symmetric)


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats: torch.Tensor | None):
    if stats is None:
        raise ValueError("gptq: no Hessian for this layer; the calibration pass did not reach it")
    dtype = old.weight.dtype
    H = stats
    order = None
    if cfg.act_order:  # decreasing H_jj, dead inputs counted as 1 as the reference does after fixing them
        diag = torch.diagonal(H).clone()
        order = torch.argsort(torch.where(diag == 0, torch.ones_like(diag), diag), descending=True)
    codes, scale, zero, _ = gptq(
        old.weight.data.to(H.device),
        H,
        cfg.bits,
        cfg.group_size,
        cfg.damp_percent,
        group_fit(cfg),
        order=order,
        static_groups=cfg.static_groups,
        scale_dtype=dtype if cfg.round_scales_first else None,
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
