"""OWQ (Lee et al. 2024, outlier-aware weight quantization): per layer, the k input columns with the largest
sensitivity lambda_j * ||dW_:,j||^2 stay in 16 bits, where lambda_j = H_jj (the sum of x_j^2 over calibration
tokens) and dW is the column's round-to-nearest error at the configured bits and group size; the other columns
are quantized with GPTQ. Storage and layer: weakcol.py."""

from __future__ import annotations

import torch

from qpeft_bench.quant.gptq import layer_hessians
from qpeft_bench.quant.qlinear import dequantize_groups
from qpeft_bench.quant.rtn import quantize_weight
from qpeft_bench.quant.weakcol import (  # noqa: F401 - the quantizer protocol, shared with QEFT
    Config,
    check_against_arch,
    dequantize,
    layer_classes,
    linear_storage,
    quantize_with_weak_columns,
    state_bytes,
)

NEEDS_CALIBRATION = True
COMPILE_TESTED = True  # the layer of QEFT, measured compiled
WEAK_COLUMNS = True


def prepare(model, targets: list[str], cfg: Config, windows: torch.Tensor, device: str) -> dict:
    return layer_hessians(model, targets, windows, device)


def weak_columns(weight: torch.Tensor, H: torch.Tensor, k: int, bits: int, group_size: int) -> torch.Tensor:
    """Indices of the k columns with the largest lambda_j * ||dW_:,j||^2 (sorted)."""
    codes, scale, zero = quantize_weight(weight, bits, group_size, symmetric=False)
    deq = dequantize_groups(codes, scale, zero, group_size)
    sensitivity = torch.diagonal(H) * (deq - weight.float()).pow(2).sum(0)
    return torch.topk(sensitivity, k).indices.sort().values


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats: torch.Tensor | None):
    if stats is None:
        raise ValueError("owq: no Hessian for this layer; the calibration pass did not reach it")
    weak = weak_columns(old.weight.data.to(stats.device), stats, cfg.k, cfg.bits, cfg.group_size)
    return quantize_with_weak_columns(old, stats, weak, cfg, device)
