"""Fused LoRA / DoRA (the ``train.fused_lora`` speed switch; speedups.py turns it on): every peft LoRA/DoRA layer on
a frozen base runs as one autograd function, computing the same function as peft's path (up to float rounding).

The plain path is bitsandbytes' 4-bit matmul, then peft's ``result.clone()``, dropout, A, B, a scaling multiply and
an add, each a pass over an activation-sized tensor, several of them repeated in backward. Here the base product and
the scaled low-rank product share one output buffer (``addmm`` writes the sum in the GEMM's epilogue), the
dequantized weight lives only for the matmul that needs it, and backward saves only the (dropped-out) input and the
rank-r intermediate. DoRA's column norm ||W + sBA|| comes from ||W|| (once per layer) and two rank-r products,
without forming W + sBA; with dropout 0 its base and low-rank terms share one GEMM (peft computes W·x twice when
dropout is on, and so do we: that second product is part of DoRA's definition with dropout).

The fused function stands in for peft's layer where the base computes exactly x @ dequantize(W)^T + bias (the
quantizer's FUSED_LORA_BASE); layers that also round their activations (LLM.int8, SmoothQuant W8A8) compute
something else and keep peft's path.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from qpeft_bench import quant


class _FusedLoRA(torch.autograd.Function):
    """out = x W^T + bias + s·(drop(x) A^T) B^T  (LoRA), or with a magnitude m (DoRA, peft's definition):
    out = x W^T + bias + (g - 1)·(drop(x) W^T) + g·s·(drop(x) A^T) B^T,  g = m / ||W + s B A||_row (no gradient
    through the norm, as in the paper and peft). With dropout off the DoRA output is g·(x W^T + s·x A^T B^T) + bias.

    `weight` is a zero-argument function returning the frozen base weight (out, in) in the compute dtype: the
    quantized layer is dequantized in forward and again in backward, never kept. `cache` is the layer's own dict
    for what depends on the frozen weight only (DoRA: its row norms)."""

    @staticmethod
    def forward(
        ctx,
        x,
        a,
        b,
        mag,
        bias,
        weight: Callable[[], torch.Tensor],
        scale: float,
        p: float,
        cdt: torch.dtype,
        out_dtype: torch.dtype,
        cache: dict,
    ):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(cdt)
        w = weight()
        a_c, b_c = a.to(cdt), b.to(cdt)
        out = x2 @ w.t()
        mask = None
        xd = x2
        if p > 0:
            xd, mask = torch.native_dropout(x2, p, True)
        h = xd @ a_c.t()  # (tokens, r): small, saved for B's gradient
        if mag is None:
            out.addmm_(h, b_c.t(), alpha=scale)
            g = norm = u = None
        else:
            with torch.no_grad():  # ||W + s B A|| per output row, a detached constant as in DoRA, without forming
                # W + s B A: ||W_i||^2 (W is frozen: computed once) + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i
                if "w_norm2" not in cache:
                    cache["w_norm2"] = w.float().pow(2).sum(1)
                b32, a32 = b.float(), a.float()
                cross = ((w @ a_c.t()).float() * b32).sum(1)
                lora2 = ((b32 @ (a32 @ a32.t())) * b32).sum(1)
                norm = (cache["w_norm2"] + 2 * scale * cross + scale * scale * lora2).clamp_min(0).sqrt()
            g = (mag.float() / norm).to(cdt)
            # u = drop(x) W^T + s·l is what the magnitude multiplies: its gradient needs it
            if p == 0:
                u = out.addmm_(h, b_c.t(), alpha=scale)
                out = u * g
            else:
                z = xd @ w.t()
                u = torch.addmm(z, h, b_c.t(), alpha=scale)
                out.add_(u * g).sub_(z)  # x W^T + g·u - z = x W^T + (g - 1)·z + g·s·l
        del w
        if bias is not None:
            out += bias.to(cdt)
        ctx.weight, ctx.scale, ctx.p, ctx.cdt, ctx.lead = weight, scale, p, cdt, lead
        ctx.dtypes = (x.dtype, a.dtype, b.dtype, None if mag is None else mag.dtype)
        ctx.save_for_backward(xd, mask, h, a, b, g, norm, u)
        return out.to(out_dtype).reshape(*lead, -1)

    @staticmethod
    def backward(ctx, dout):
        xd, mask, h, a, b, g, norm, u = ctx.saved_tensors
        scale, p, cdt = ctx.scale, ctx.p, ctx.cdt
        x_dtype, a_dtype, b_dtype, m_dtype = ctx.dtypes
        dy = dout.reshape(-1, dout.shape[-1]).to(cdt)
        a_c, b_c = a.to(cdt), b.to(cdt)
        dmag = None
        if g is None:
            dl = dy  # gradient reaching the low-rank product (before its scale)
            dbase = dy
        else:
            dmag = ((dy.float() * u.float()).sum(0) / norm).to(m_dtype)
            dl = dy * g
            dbase = dy * g if p == 0 else dy  # through x W^T: the g-scaled path when one GEMM carried both terms
        dh = (dl @ b_c) * scale  # (tokens, r)
        db = ((dl.t() @ h) * scale).to(b_dtype)
        da = (dh.t() @ xd).to(a_dtype)
        w = ctx.weight()
        dx = dbase @ w
        dxd = dh @ a_c
        if g is not None and p > 0:
            dxd.addmm_(dy * (g - 1), w)  # the (g - 1)·(drop(x) W^T) term
        del w
        if mask is not None:
            dxd = torch.ops.aten.native_dropout_backward(dxd, mask, 1.0 / (1.0 - p))
        dx += dxd
        dbias = None
        return dx.to(x_dtype).reshape(*ctx.lead, -1), da, db, dmag, dbias, None, None, None, None, None, None


def _base_weight(base: nn.Module, cdt: torch.dtype) -> Callable[[], torch.Tensor]:
    from qpeft_bench.adapters.base import dense_weight

    return lambda: dense_weight(base).to(cdt)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft LoraLayer.forward for one active vanilla/DoRA adapter, unmerged; anything else (merged weights, mixed
    adapter batches, disabled adapters) takes peft's own forward, which computes the same thing."""
    adapters = [n for n in self.active_adapters if n in self.lora_A]
    if args or kwargs or self.merged or self.disable_adapters or len(adapters) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    base = self.get_base_layer()
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    mag = self.lora_magnitude_vector[name].weight if name in getattr(self, "lora_magnitude_vector", {}) else None
    device = x.device.type
    if torch.is_autocast_enabled(device):
        cdt = torch.get_autocast_dtype(device)
    else:
        cdt = getattr(base, "compute_dtype", None) or x.dtype
    # bitsandbytes' layers return their input's dtype (OUTPUT_FOLLOWS_INPUT_DTYPE); the others compute with F.linear
    # or matmul, which under autocast return the autocast dtype
    follows_input = quant.capability(quant.owner(base), "OUTPUT_FOLLOWS_INPUT_DTYPE")
    follows_input = follows_input or not torch.is_autocast_enabled(device)
    out_dtype = x.dtype if follows_input else cdt
    with torch.autocast(device, enabled=False):
        return _FusedLoRA.apply(
            x,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            mag,
            getattr(base, "bias", None),
            _base_weight(base, cdt),
            self.scaling[name],
            p,
            cdt,
            out_dtype,
            self.__dict__.setdefault("_qpeft_fused_cache", {}),
        )


def fuse_lora(model: nn.Module) -> int:
    """Route every peft LoRA layer with a fusable base through the fused function; returns how many. Layers with
    other bases keep peft's path (the record says how many were fused)."""
    from peft.tuners.lora.layer import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and quant.capability(quant.owner(module.get_base_layer()), "FUSED_LORA_BASE"):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n


def unfuse_lora(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), types.MethodType):
            del module.forward
        module.__dict__.pop("_qpeft_fused_cache", None)
