"""`GroupQuantLinear`: the storage layer of our own group-wise integer quantizers (RTN, GPTQ; the weak-column
formats of OWQ/QEFT extend it). Codes are packed densely into uint8, eight codes into `bits` bytes (so 3-bit
codes cost exactly 3 bits); each group of `group_size`
consecutive input features of a row has a scale and a zero point in the model's dtype. Everything is a
buffer, so `get_memory_footprint()` and our `quantized_model_bytes` agree for this format.

The forward dequantizes the weight and calls F.linear: simple and exact; speed is not the point of this format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKABLE_BITS = (2, 3, 4, 8)
PACK_WIDTH = 8  # codes per packed unit; a unit is `bits` bytes, so in_features must be a multiple of 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, in) integer codes in [0, 2^bits) -> (out, in * bits / 8) uint8.

    Eight codes form one 8*bits-bit integer (code k at bit k*bits, low bits first) stored as `bits` bytes,
    little-endian. For 2, 4 and 8 bits this is the familiar layout with whole codes inside each byte."""
    c = codes.to(torch.int64).reshape(codes.shape[0], -1, PACK_WIDTH)
    word = torch.zeros(c.shape[:2], dtype=torch.int64, device=codes.device)
    for k in range(PACK_WIDTH):
        word |= c[:, :, k] << (k * bits)
    parts = [(word >> (8 * m)) & 0xFF for m in range(bits)]
    return torch.stack(parts, dim=-1).reshape(codes.shape[0], -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    b = packed.to(torch.int64).reshape(packed.shape[0], -1, bits)
    word = torch.zeros(b.shape[:2], dtype=torch.int64, device=packed.device)
    for m in range(bits):
        word |= b[:, :, m] << (8 * m)
    mask = (1 << bits) - 1
    parts = [(word >> (k * bits)) & mask for k in range(PACK_WIDTH)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1).to(torch.uint8)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) codes -> weights (code - zero) * scale, per group, in the dtype of the scales."""
    grouped = codes.to(scales.dtype).reshape(codes.shape[0], -1, group_size)
    return ((grouped - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(codes.shape)


def check_layout(group_size: int, shapes: dict[str, tuple[int, int]]) -> None:
    """Sizes the group-wise format needs: groups tile each row, and rows pack into whole units."""
    from qpeft_bench.config import ConfigError

    if group_size <= 0:
        raise ConfigError(f"quant.group_size={group_size} must be > 0")
    for name, (in_f, out_f) in shapes.items():
        if in_f % group_size:
            raise ConfigError(
                f"quant.group_size={group_size} does not divide in_features={in_f} of {name} "
                f"({in_f} -> {out_f}); choose a divisor of {in_f}"
            )
        if in_f % PACK_WIDTH:
            raise ConfigError(
                f"{name} ({in_f} -> {out_f}): in_features must be a multiple of {PACK_WIDTH} to pack the codes"
            )


def storage_bytes(in_f: int, out_f: int, bits: int, group_size: int, elem: int, bias: bool) -> int:
    """Bytes of one GroupQuantLinear: packed codes, a scale and a zero point per group, the bias."""
    return in_f * out_f * bits // 8 + 2 * (in_f * out_f // group_size) * elem + (out_f * elem if bias else 0)


class QuantLinear(nn.Module):
    """Base of our own quantized layers: y = W x (+ b) like nn.Linear, with W held in some compressed form.

    Adapters (peft's LoRA wrapper among them) recognise every subclass through this one class."""

    in_features: int
    out_features: int

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError


class GroupQuantLinear(QuantLinear):
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
    ):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.register_buffer("qweight", pack(codes, bits))
        self.register_buffer("scales", scales)  # (out, in / group_size)
        self.register_buffer("zeros", zeros)  # (out, in / group_size), in code units
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(unpack(self.qweight, self.bits), self.scales, self.zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
