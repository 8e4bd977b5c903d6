"""bitsandbytes 4-bit weights: NF4 or FP4, blocks of `blocksize` with an absmax each, optional double
quantization (the absmax values stored as 8-bit codes with an fp32 scale per 256 blocks).

We quantize a loaded model in place rather than through `from_pretrained(quantization_config=...)`, so every
quantizer works on the same already-loaded model and the unquantized sizes can be measured first.
"""

from __future__ import annotations

import math
import sys
import typing
from dataclasses import dataclass

import torch

from qpeft_bench.config import ConfigError
from qpeft_bench.models import DTYPE

# Every tensor of the quantized layer follows Module.to(): a sweep may keep the base on the CPU between runs
# (quantized_base._BASE_CACHE).
PROCESS_REUSE = True

# bitsandbytes' layers return their input's dtype, not autocast's: with fp32 norms the stream stays fp32
# (the plan-mode memory estimate needs to know; qpeft_bench/estimate.py).
OUTPUT_FOLLOWS_INPUT_DTYPE = True
FUSED_LORA_BASE = True  # x @ dequantize(W)^T + b, with the weight dequantized for each matmul
COMPILE_TESTED = True
PEFT_WRAPS = True  # peft has its own layer for it
# the 4-bit codes are a parameter (stored in the model's dtype under FSDP, so a block flattens into one tensor)
FSDP_SHARDABLE = True

NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed block size of the second (double-quant) level
NESTED_CODE_ENTRIES = 256  # the 8-bit dynamic code of the second level, fp32 entries
CODE_ENTRIES = 16  # the 4-bit code book (NF4 or FP4 values), fp32 entries
FP32 = 4


@dataclass
class Config:
    quant_type: typing.Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    blocksize: int = 64  # QLoRA's setting; bitsandbytes accepts 64..4096 (powers of two)
    # the dtype the packed 4-bit codes are stored in (the same bytes either way). FSDP flattens a block's tensors
    # into one of a single dtype, so with train.distributed=fsdp `auto` is the model's dtype (config.validate)
    quant_storage: typing.Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    allowed = (32, 64, 128, 256, 512, 1024, 2048, 4096)
    if cfg.blocksize not in allowed:
        raise ConfigError(f"quant.blocksize={cfg.blocksize} is not supported by bitsandbytes; use one of {allowed}")


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats=None):
    import bitsandbytes as bnb

    storage = torch.uint8 if cfg.quant_storage in ("auto", "uint8") else DTYPE[cfg.quant_storage]

    new = bnb.nn.Linear4bit(
        old.in_features,
        old.out_features,
        bias=old.bias is not None,
        compute_dtype=DTYPE[compute_dtype],
        compress_statistics=cfg.double_quant,
        quant_type=cfg.quant_type,
        quant_storage=storage,
        device="meta",  # placeholders only; the real tensors are assigned below
    )
    new.weight = bnb.nn.Params4bit(
        old.weight.data.to("cpu") if device == "cpu" else old.weight.data,
        requires_grad=False,
        quant_type=cfg.quant_type,
        blocksize=cfg.blocksize,
        compress_statistics=cfg.double_quant,
        quant_storage=storage,
    )
    if old.bias is not None:
        new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
    new = new.to(device)  # moving Params4bit to a device is what quantizes it
    # On CPUs with AVX512-BF16, an eval-mode forward repacks the weight for a gemv kernel that has no
    # autograd: gradients of everything before that layer are then silently wrong. Never take that path.
    new.support_avx512bf16_for_cpu = False
    return new


def linear_storage(in_f: int, out_f: int, bias: bool, cfg: Config, dtype: str) -> tuple[int, int]:
    n = in_f * out_f
    weight = math.ceil(n / 2)  # two 4-bit codes per uint8
    bias_bytes = out_f * torch.tensor([], dtype=DTYPE[dtype]).element_size() if bias else 0
    blocks = math.ceil(n / cfg.blocksize)
    state = CODE_ENTRIES * FP32
    if cfg.double_quant:
        # uint8 absmax codes + fp32 scale per 256 blocks + the 8-bit code book + one fp32 offset
        state += blocks + math.ceil(blocks / NESTED_BLOCKSIZE) * FP32 + NESTED_CODE_ENTRIES * FP32 + FP32
    else:
        state += blocks * FP32
    return weight + bias_bytes, state


def dequantize(module) -> torch.Tensor:
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(module.weight.data, module.weight.quant_state)


def _tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of the tensors held by a bitsandbytes QuantState, following its nested state2."""
    total = 0
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor) and id(value) not in seen:
            seen.add(id(value))
            total += value.numel() * value.element_size()
        elif isinstance(value, _quant_state_class()):
            total += _tensor_bytes(value, seen)
    return total


def _quant_state_class() -> type:
    from bitsandbytes.functional import QuantState

    return QuantState


def state_bytes(module) -> int:
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
    return 0 if quant_state is None else _tensor_bytes(quant_state, set())


def layer_classes() -> tuple[type, ...]:
    bnb = sys.modules.get("bitsandbytes")  # not imported: no bitsandbytes layer exists to own
    return () if bnb is None else (bnb.nn.Linear4bit,)
