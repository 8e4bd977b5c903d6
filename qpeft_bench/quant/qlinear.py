"""`GroupQuantLinear`: the storage layer of our own group-wise integer quantizers (RTN now; GPTQ and the
weak-column formats build on it). Codes are packed into uint8, 8/bits per byte; each group of `group_size`
consecutive input features of a row has a scale and a zero point in the model's dtype. Everything is a
buffer, so `get_memory_footprint()` and our `quantized_model_bytes` agree for this format.

The forward dequantizes the weight and calls F.linear: simple and exact; speed is not the point of this format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKABLE_BITS = (2, 4, 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, in) integer codes in [0, 2^bits) -> (out, in * bits / 8) uint8, low bits first."""
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(codes.shape[0], -1, per)
    out = torch.zeros(c.shape[:2], dtype=torch.uint8, device=codes.device)
    for k in range(per):
        out |= c[:, :, k] << (k * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (k * bits)) & mask for k in range(per)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)


class QuantLinear(nn.Module):
    """Base of our own quantized layers: y = W x (+ b) like nn.Linear, with W held in some compressed form.

    Adapters (peft's LoRA wrapper among them) recognise every subclass through this one class."""

    in_features: int
    out_features: int

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError


class GroupQuantLinear(QuantLinear):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: torch.Tensor | None,
                 codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.register_buffer("qweight", pack(codes, bits))
        self.register_buffer("scales", scales)  # (out, in / group_size)
        self.register_buffer("zeros", zeros)  # (out, in / group_size), in code units
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        codes = unpack(self.qweight, self.bits).to(self.scales.dtype)
        grouped = codes.reshape(self.out_features, -1, self.group_size)
        weight = (grouped - self.zeros.unsqueeze(-1)) * self.scales.unsqueeze(-1)
        return weight.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
