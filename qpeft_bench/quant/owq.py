"""OWQ (Lee et al. 2024, outlier-aware weight quantization): per layer, the k input columns with the largest
sensitivity H_jj * ||dW_:,j||^2 stay in 16 bits, where dW is the column's error under a temporary whole-row fit of
the configured tuning (MSE by default); the other columns are quantized with GPTQ in input order, in compact groups
fitted (MSE) when the sweep reaches them. This restates xvyaward/owq (`main.py` defaults, `owq/recon.py`
`hessian_sorting` and `fasterquant`, `owq/quant.py` `find_params`); docs/fidelity.md says what is identical.
Storage and layer: weakcol.py."""

from __future__ import annotations

import torch

from qpeft_bench.quant.gptq import prepare  # noqa: F401 - Hessians of the layers' inputs, block by block
from qpeft_bench.quant.weakcol import (  # noqa: F401 - the quantizer protocol, shared with QEFT
    Config,
    check_against_arch,
    dequantize,
    layer_classes,
    linear_storage,
    quantize_with_weak_columns,
    scores,
    state_bytes,
)

NEEDS_CALIBRATION = True
SEQUENTIAL = True  # the reference calibrates block by block on the quantized blocks' outputs
COMPILE_TESTED = True  # the layer of QEFT, measured compiled
WEAK_COLUMNS = True


def weak_columns(weight: torch.Tensor, diag: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the k columns with the largest score, in decreasing score as the reference orders them; the
    scores), from the Hessian's diagonal `diag`."""
    score = scores(weight, diag, cfg)
    return torch.argsort(score, descending=True)[: cfg.k], score


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats: torch.Tensor | None):
    if stats is None:
        raise ValueError("owq: no Hessian for this layer; the calibration pass did not reach it")
    weak, score = weak_columns(old.weight.data.to(stats.device), torch.diagonal(stats), cfg)
    return quantize_with_weak_columns(old, stats, weak, cfg, device, score=score)
