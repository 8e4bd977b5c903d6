"""No quantization: the base stays in the model's dtype (the 'LoRA on a 16-bit base' reference rows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qpeft_bench.models import DTYPE

PROCESS_REUSE = True  # plain tensors only: the base can wait on the CPU between runs (quantized_base._BASE_CACHE)
FUSED_LORA_BASE = True
FSDP_SHARDABLE = True  # the weights are parameters
PEFT_WRAPS = True  # peft has its own layer for it


@dataclass
class Config:
    pass


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    pass


def quantize_linear(linear, cfg: Config, compute_dtype: str, device: str, stats=None):
    return linear


def linear_storage(in_f: int, out_f: int, bias: bool, cfg: Config, dtype: str) -> tuple[int, int]:
    itemsize = torch.tensor([], dtype=DTYPE[dtype]).element_size()
    return (in_f * out_f + (out_f if bias else 0)) * itemsize, 0


def dequantize(module) -> torch.Tensor:
    return module.weight.data


def state_bytes(module) -> int:
    return 0


def layer_classes() -> tuple[type, ...]:
    return (nn.Linear,)
