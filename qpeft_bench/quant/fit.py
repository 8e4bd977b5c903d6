"""Fitting a scale and zero point to rows of weights, and rounding onto that grid, as the reference code does.

Two fits, each restating its reference (docs/fidelity.md names the files):
- `minmax`: GPTQ's `Quantizer.find_params` (IST-DASLab/gptq `quant.py`), also RTN's. The range always includes 0
  (min(x, 0) .. max(x, 0)), an all-zero row gets the range [-1, 1], and the zero point is round(-min / scale).
- `mse`: OWQ's and QEFT's `find_params` with `mse=True` (xvyaward/owq `owq/quant.py`, their default `--tuning mse`):
  a grid search over `num` range fractions i/num (i = 1..num) and every integer zero point, minimising
  mean |x - Q(x)|^2.4 per row; the first minimum wins (strict <).

Rounding is `clamp(round(x / scale) + zero, 0, 2^bits - 1)`: round first, then shift, as every one of those
references does (rounding x / scale + zero instead flips x.5 ties when the zero point is odd).
All arithmetic is fp32, in the references' order of operations, so results agree bit for bit on the same inputs.
"""

from __future__ import annotations

import torch

EPS = 1e-8  # the references' floor on a searched scale (OWQ/QEFT `self.eps`)
NORM = 2.4  # the error norm of the MSE search (OWQ/QEFT `lp_loss(..., 2.4)`)


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of w on the grid (code - zero) * scale; shapes broadcast."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def minmax(x: torch.Tensor, bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of a 2-D fp32 tensor, GPTQ's min-max fit."""
    maxq = 2**bits - 1
    zeros = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1).values, zeros)
    xmax = torch.maximum(x.max(1).values, zeros)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        neg = xmin < 0
        xmin = torch.where(neg, -xmax, xmin)  # a row with no negative value keeps xmin = 0, as the reference does
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def mse(x: torch.Tensor, bits: int, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of a 2-D fp32 tensor, OWQ/QEFT's asymmetric MSE grid search over `num` range
    fractions and all 2^bits zero points."""
    maxq = 2**bits - 1
    zeros = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1).values, zeros)
    xmax = torch.maximum(x.max(1).values, zeros)
    eps = torch.tensor(EPS, device=x.device)
    best = torch.full_like(xmin, 1e10)
    best_min, best_max = xmin.clone(), xmax.clone()
    xrange = xmax - xmin
    lo = torch.zeros_like(xmin)
    zps = torch.arange(2**bits, device=x.device, dtype=x.dtype)
    for i in range(1, num + 1):
        hi = xrange / num * i
        delta = torch.maximum((hi - lo) / maxq, eps)
        scale = delta.unsqueeze(1)
        rounded = torch.round(x / scale)
        # every zero point at once; the first minimum wins, as the references' sequential strict < over zp does
        new_min = lo - zps.unsqueeze(1) * delta  # (zp, rows)
        new_max = hi - zps.unsqueeze(1) * delta
        zero = torch.clamp(-torch.round(new_min / delta), 0, maxq).unsqueeze(2)  # (zp, rows, 1)
        err = (scale * (torch.clamp(rounded + zero, 0, maxq) - zero) - x).abs().pow(NORM).mean(2)
        for zp in range(2**bits):
            better = err[zp] < best
            best_min = torch.where(better, new_min[zp], best_min)
            best_max = torch.where(better, new_max[zp], best_max)
            best = torch.minimum(best, err[zp])
    neg = torch.minimum(best_min, torch.zeros_like(best_min))
    pos = torch.maximum(best_max, torch.zeros_like(best_max))
    scale = torch.maximum((pos - neg) / maxq, eps)
    zero = torch.clamp(-torch.round(neg / scale), 0, maxq)
    return scale, zero


def fit(x: torch.Tensor, bits: int, tuning: str, num: int = 40, symmetric: bool = False):
    """(scale, zero) per row with the named fit; `num`: the MSE search's grid size."""
    if tuning == "mse":
        if symmetric:
            raise ValueError("the MSE fit is implemented for asymmetric grids only (the references' default)")
        return mse(x, bits, num)
    return minmax(x, bits, symmetric)
