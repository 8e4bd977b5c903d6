"""Q-BaRA, quantized LLMs with balanced-rank adaptation (Shen et al., "Accurate and Efficient Fine-Tuning of
Quantized Large Language Models Through Optimal Balance", arXiv 2407.17029; TACL 2025 calls it Q-BLoRA).

With balance lambda and rank r, on a frozen base layer of any quantizer:

    y = base(x) + s * repeat_lambda( B A dropout(pool_lambda(x)) ),   A: (lambda r, in / lambda),
                                                                       B: (out / lambda, lambda r),  s = alpha / r

pool_lambda averages each run of lambda consecutive input features, repeat_lambda repeats each output lambda times
in place. The simpler input and output buy a lambda times higher rank for the same trainable parameters as LoRA:
(in / lambda)(lambda r) + (lambda r)(out / lambda) = r (in + out); `verify` checks exactly that on every layer.

Choices and where they come from (the authors' code, github.com/xiaocaigou/qbaraqahira, layer.py and bnb.py):
the scale is alpha / r with the LoRA rank r (not lambda r); dropout acts on the pooled input; A starts like LoRA's A
(Kaiming-uniform, a = sqrt(5)) and B at zero, so training starts from the quantized base's own function. When
lambda r exceeds min(in, out) / lambda the rank saturates (B A is then full rank); that is allowed, since the exact
merge below needs lambda to be a multiple of the quantization group size.

Merge: the update as a weight is dW[o, j] = s (B A)[o // lambda, j // lambda] / lambda. When lambda is a multiple of
the base's group size and the base stores a zero point per group of inputs (rtn, gptq; hqq with plain zero points
along the inputs; see base.group_size_of), dW is constant within every quantization group and is folded exactly into
the zero points: the merged layer is the same quantized layer, with no extra path. Otherwise the merge is a plain
nn.Linear holding the dequantized weight plus dW (base.merge_dense), in the dtype the base computes with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qpeft_bench.adapters import base
from qpeft_bench.config import positive
from qpeft_bench.models import DTYPE

METHOD = "qbara"


@dataclass
class Config:
    r: int = 8
    alpha: float = 16
    balance: int = 2  # lambda; the authors' LLaMA runs use 2
    dropout: float = 0.05
    adapter_dtype: str = "bfloat16"

    def check(self, where: str) -> None:
        positive(where, "r", self.r)
        positive(where, "alpha", self.alpha)
        positive(where, "balance", self.balance)
        base.check_common(where, self.dropout, self.adapter_dtype)


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    base.check_divides("peft.balance", cfg.balance, shapes, "in,out")


def unsupported(quant_name: str, qcfg, cfg: Config) -> str | None:
    # The adapter only reads the layer's input and adds to its output, so every base layer works
    # (tests/test_qbara_qahira.py trains it on each quantizer).
    return None


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared with qahira.py (candidates for adapters/base.py)
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------------


class QBaRALinear(base.AdapterLinear):
    def __init__(self, layer: nn.Module, r: int, balance: int, alpha: float, dropout: float, dtype: torch.dtype):
        super().__init__(layer)
        self.balance, self.scale = balance, alpha / r
        device = base.device_of(layer)
        a = torch.empty(balance * r, self.in_features // balance, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # LoRA's A (drawn in fp32 so every adapter dtype starts alike)
        self.adapter = nn.Module()
        self.adapter.A = nn.Parameter(a.to(dtype))
        self.adapter.B = nn.Parameter(
            torch.zeros(self.out_features // balance, balance * r, device=device, dtype=dtype)
        )
        self.dropout = base.dropout_layer(dropout)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.adapter.A, self.adapter.B
        # pool before the cast: fewer elements to convert, and the mean in the input's precision
        h = self.dropout(base.avg_pool(x, self.balance).to(a.dtype))
        return base.repeat(F.linear(F.linear(h, a), b) * self.scale, self.balance)

    def describe(self) -> dict:
        a, b = self.adapter.A, self.adapter.B
        return {
            "rank": a.shape[0],
            "balance": self.balance,
            "scale": self.scale,
            "in_pooled": a.shape[1],
            "out_pooled": b.shape[0],
            "params": a.numel() + b.numel(),
            "dtype": str(a.dtype),
        }

    def delta_weight(self) -> torch.Tensor:
        return base.pooled_delta_weight(
            self.adapter.B.float() @ self.adapter.A.float(), self.balance, self.balance, self.scale
        )

    def merge(self) -> nn.Module:
        return base.merge_pooled(self.base, self.delta_weight(), self.balance)


PER_LAYER_KNOBS = ("r", "alpha", "balance")  # settable per layer group (peft.by_layer; qpeft_bench/layers.py)


def attach(model, targets: list[str], cfg: Config, per_module: dict[str, Config] | None = None):
    """`per_module`: {module: Config} with per-layer-group knobs (peft.by_layer)."""
    dtype = DTYPE[cfg.adapter_dtype]

    def make(name, layer, c):
        return QBaRALinear(layer, c.r, c.balance, c.alpha, c.dropout, dtype)

    model = base.attach_method(model, targets, cfg, per_module, PER_LAYER_KNOBS, make)
    verify(model, targets, cfg, per_module)
    return model


def verify(model, targets: list[str], default: Config, per_module: dict[str, Config] | None = None) -> None:
    def expected(name: str) -> dict:
        cfg = (per_module or {}).get(name, default)
        lam = cfg.balance
        layer = model.get_submodule(name)
        in_f, out_f = layer.in_features, layer.out_features
        # the parameter count is LoRA's at the same r: the method's defining property
        return {
            "rank": lam * cfg.r,
            "balance": lam,
            "scale": cfg.alpha / cfg.r,
            "in_pooled": in_f // lam,
            "out_pooled": out_f // lam,
            "params": cfg.r * (in_f + out_f),
            "dtype": str(DTYPE[cfg.adapter_dtype]),
        }

    base.verify_wrappers(model, targets, QBaRALinear, expected)


def save(model, path, cfg: Config, per_module: dict[str, Config] | None = None) -> None:
    """Each module's r, alpha and balance go with it (base.py, "per_module"); `per_module`: checked if given."""
    base.save_method(model, path, METHOD, cfg, PER_LAYER_KNOBS, per_module)


def load(model, targets: list[str], cfg: Config, path, per_module: dict[str, Config] | None = None):
    """Refuses a saved adapter whose knobs, per module too, differ from cfg and per_module (ValueError)."""
    return base.load_method(attach, model, targets, cfg, path, METHOD, PER_LAYER_KNOBS, per_module)


def merge(model):
    return base.merge_all(model)
