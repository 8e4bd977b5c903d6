"""bitsandbytes LLM.int8: `Linear8bitLt` with `has_fp16_weights=False` (frozen int8 weights).

What bitsandbytes 0.50.2 does, read from its source and pinned down by tests/test_int8.py:
- Storage: the weight is cast to fp16 and each output row is rounded to int8 against its own absmax,
  CB = round(127 w / absmax_row). CB is the `weight` parameter (an `Int8Params`); the absmax values (SCB, fp32,
  one per output row) are a plain attribute, of the parameter until the first forward and of `module.state`
  after it (`init_8bit_state` moves them). `get_memory_footprint()` therefore misses SCB; we count it as state.
- Forward, `MatMul8bitLt` (CUDA always, CPU in eval mode): the input is cast to fp16 and each token is rounded
  to int8 against its own absmax; with `threshold` > 0 every input feature in which some token reaches
  |x| >= threshold is left out of the int8 product and multiplied in the input's dtype with the dequantized
  weight columns instead (the mixed-precision decomposition); the int32 product is rescaled by
  absmax_token * SCB / 127^2.
- Forward on the CPU in train mode, `MatMul8bitFp`: bitsandbytes dequantizes the weight and calls F.linear,
  for speed. No activation quantization and `threshold` is unused: on the CPU, training sees a weight-only
  int8 layer while evaluation (and the error probe) sees LLM.int8 with quantized activations.
- Backward to the input (both paths): grad @ dequantized weight. Exact for the CPU training forward; for
  MatMul8bitLt a straight-through estimate that ignores the activation rounding, as LLM.int8 intends.
- Nothing like the 4-bit AVX512-BF16 trap of docs/design.md §7: an eval-mode forward only moves CB and SCB into
  `module.state` (the same tensors); it repacks nothing and the later training path reads the same weights.
  One CPU quirk remains: with fp16 inputs and threshold > 0, MatMul8bitLt zeroes the outliers of the input
  in place and restores them. Harmless under no_grad (our evaluation), but autograd then refuses a backward
  through an eval-mode forward; CPU training goes through MatMul8bitFp and never meets it.
- bitsandbytes casts the bias in place to the dtype of the first input that differs from it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from qpeft_bench.config import positive
from qpeft_bench.models import DTYPE

# bitsandbytes' layers return their input's dtype, not autocast's: with fp32 norms the stream stays fp32
# (the plan-mode memory estimate needs to know; qpeft_bench/estimate.py).
OUTPUT_FOLLOWS_INPUT_DTYPE = True
QUANTIZES_ACTIVATIONS = True  # MatMul8bitLt rounds each token to int8 (see above)
PEFT_WRAPS = True  # peft has its own layer for it

SCALE_BYTES = 4  # SCB: one fp32 absmax per output row


@dataclass
class Config:
    # LLM.int8's outlier threshold on |activation|: input features where any token reaches it are multiplied
    # in 16-bit; 0 disables the decomposition (all features int8).
    threshold: float = 6.0

    def check(self, where: str) -> None:
        positive(where, "threshold", self.threshold, allow_zero=True)


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    # Row-wise int8 fits every shape. (cuBLASLt wants in_features % 4 == 0; bitsandbytes falls back to an
    # fp32 matmul otherwise, which costs speed, not correctness.)
    return None


def quantize_linear(old, cfg: Config, compute_dtype: str, device: str, stats=None):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    new = bnb.nn.Linear8bitLt(
        old.in_features,
        old.out_features,
        bias=old.bias is not None,
        has_fp16_weights=False,
        threshold=cfg.threshold,
        device="meta",
    )  # placeholders only; the real tensors are assigned below
    # `Int8Params.to(device)` quantizes only a weight that sits on the CPU (a model loaded on CUDA would stay
    # unquantized until its first forward). bitsandbytes' own row-wise quantizer, called here on `device`,
    # does the same arithmetic wherever the model was loaded: fp16 cast, absmax per output row.
    half = old.weight.data.to(device=device, dtype=torch.float16).contiguous()
    codes, absmax, _ = bf.int8_vectorwise_quant(half)
    if not torch.isfinite(absmax).all():
        raise ValueError(
            f"int8: a weight of this {old.in_features} -> {old.out_features} layer exceeds fp16's "
            "range (65504); LLM.int8 casts weights to fp16 before quantizing them"
        )
    new.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=absmax)
    if old.bias is not None:  # kept in the model's dtype, as linear_storage counts it
        new.bias = nn.Parameter(old.bias.data.to(device), requires_grad=False)
    return new


def linear_storage(in_f: int, out_f: int, bias: bool, cfg: Config, dtype: str) -> tuple[int, int]:
    bias_bytes = out_f * torch.tensor([], dtype=DTYPE[dtype]).element_size() if bias else 0
    return in_f * out_f + bias_bytes, out_f * SCALE_BYTES  # one int8 code per weight; SCB outside parameters


def row_absmax(module) -> torch.Tensor:
    """SCB, the per-row absmax, wherever bitsandbytes keeps it at the moment (see the module docstring)."""
    scb = getattr(module.weight, "SCB", None)
    return module.state.SCB if scb is None else scb


def dequantize(module) -> torch.Tensor:
    # The very arithmetic of bitsandbytes' own dequantization (MatMul8bitFp and the input gradient), so that an
    # fp32 reference built from it reproduces the CPU training forward bit for bit.
    return module.weight.data.float().mul_(row_absmax(module).unsqueeze(1).mul(1.0 / 127.0))


def state_bytes(module) -> int:
    # Only SCB: `state.CB` is the weight parameter's own tensor, and `state.idx` (the outlier features of the
    # last forward) is scratch, not storage.
    scb = row_absmax(module)
    return 0 if scb is None else scb.numel() * scb.element_size()


def layer_classes() -> tuple[type, ...]:
    bnb = sys.modules.get("bitsandbytes")  # not imported: no bitsandbytes layer exists to own
    return () if bnb is None else (bnb.nn.Linear8bitLt,)
