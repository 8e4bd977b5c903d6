"""QA-HiRA, quantization-aware fine-tuning with higher-rank adaptation (Shen et al., arXiv 2407.17029; TACL 2025
calls it QA-BLoRA). One matrix C instead of two low-rank factors, on a frozen base layer of any quantizer:

    y = base(x) + s * repeat_lambda2( C dropout(pool_lambda1(x)) ),   C: (out / lambda2, in / lambda1)

so the trainable parameters are in * out / (lambda1 * lambda2), whatever the LoRA rank would be, and the update
can reach rank min(in / lambda1, out / lambda2). Typical (lambda1, lambda2) = (4, 8) (the authors' code) or (8, 8).

Choices and where they come from (the authors' code, github.com/xiaocaigou/qbaraqahira, layer.py and bnb.py):
- the scale: their forward multiplies by lora_alpha / r although QA-HiRA has no rank; with qlora.py's defaults
  (r 64, alpha 16; their run script sets neither, and their merge.py uses 0.25) that is 0.25. We expose the
  product as `scale`, default 0.25.
- dropout acts on the pooled input, as there.
- init: their C is peft's lora_A, so Kaiming-uniform (`init: kaiming`, the default), and the model's function
  changes before the first step. `init: zeros` is ours, opt-in: training starts from the quantized base's own
  function, like LoRA's, and since C is the only factor its gradient is not zero (nothing multiplies it);
  docs/fidelity.md has its measured effect.

Merge: the update as a weight is dW[o, j] = s C[o // lambda2, j // lambda1] / lambda1. When lambda1 is a multiple of
the base's group size and the base stores a zero point per group of inputs (rtn, gptq; hqq with plain zero points
along the inputs; see base.group_size_of), dW is constant within every quantization group and is folded exactly into
the zero points: the merged model is the quantized model itself, with no extra path (the authors' merge.py instead
adds 0.25 * repeat(C) to fp16 weights, where s / lambda1 = 0.0625 is due). Otherwise the merge is a plain
nn.Linear holding the dequantized weight plus dW (base.merge_dense), in the dtype the base computes with.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qpeft_bench.adapters import base
from qpeft_bench.config import positive
from qpeft_bench.models import DTYPE

METHOD = "qahira"


@dataclass
class Config:
    lambda1: int = 4  # input pooling
    lambda2: int = 8  # output repetition
    scale: float = 0.25
    init: typing.Literal["zeros", "kaiming"] = "kaiming"  # the authors' (peft's lora_A init)
    dropout: float = 0.05
    adapter_dtype: str = "bfloat16"

    def check(self, where: str) -> None:
        positive(where, "lambda1", self.lambda1)
        positive(where, "lambda2", self.lambda2)
        positive(where, "scale", self.scale)
        base.check_common(where, self.dropout, self.adapter_dtype)


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    base.check_divides("peft.lambda1", cfg.lambda1, shapes, "in")
    base.check_divides("peft.lambda2", cfg.lambda2, shapes, "out")


def unsupported(quant_name: str, qcfg, cfg: Config) -> str | None:
    # The adapter only reads the layer's input and adds to its output, so every base layer works
    # (tests/test_qbara_qahira.py trains it on each quantizer).
    return None


class QAHiRALinear(base.AdapterLinear):
    def __init__(
        self, layer: nn.Module, lambda1: int, lambda2: int, scale: float, init: str, dropout: float, dtype: torch.dtype
    ):
        super().__init__(layer)
        self.lambda1, self.lambda2, self.scale = lambda1, lambda2, scale
        c = torch.zeros(self.out_features // lambda2, self.in_features // lambda1, device=base.device_of(layer))
        if init == "kaiming":
            nn.init.kaiming_uniform_(c, a=math.sqrt(5))  # what peft's lora_A gets, as in the authors' code
        self.adapter = nn.Module()
        self.adapter.C = nn.Parameter(c.to(dtype))
        self.dropout = base.dropout_layer(dropout)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        c = self.adapter.C
        h = self.dropout(base.avg_pool(x, self.lambda1).to(c.dtype))  # pool first: see qbara.QBaRALinear.delta
        return base.repeat(F.linear(h, c) * self.scale, self.lambda2)

    def describe(self) -> dict:
        c = self.adapter.C
        return {
            "lambda1": self.in_features // c.shape[1],
            "lambda2": self.out_features // c.shape[0],
            "scale": self.scale,
            "params": c.numel(),
            "dtype": str(c.dtype),
        }

    def delta_weight(self) -> torch.Tensor:
        return base.pooled_delta_weight(self.adapter.C, self.lambda1, self.lambda2, self.scale)

    def merge(self) -> nn.Module:
        return base.merge_pooled(self.base, self.delta_weight(), self.lambda1)


PER_LAYER_KNOBS = ("lambda1", "lambda2", "scale")  # settable per layer group (peft.by_layer; layers.py)


def attach(model, targets: list[str], cfg: Config, per_module: dict[str, Config] | None = None):
    """`per_module`: {module: Config} with per-layer-group knobs (peft.by_layer)."""
    dtype = DTYPE[cfg.adapter_dtype]

    def make(name, layer, c):
        return QAHiRALinear(layer, c.lambda1, c.lambda2, c.scale, c.init, c.dropout, dtype)

    model = base.attach_method(model, targets, cfg, per_module, PER_LAYER_KNOBS, make)
    verify(model, targets, cfg, per_module)
    return model


def verify(model, targets: list[str], default: Config, per_module: dict[str, Config] | None = None) -> None:
    def expected(name: str) -> dict:
        cfg = (per_module or {}).get(name, default)
        layer = model.get_submodule(name)
        return {
            "lambda1": cfg.lambda1,
            "lambda2": cfg.lambda2,
            "scale": cfg.scale,
            "params": layer.in_features * layer.out_features // (cfg.lambda1 * cfg.lambda2),
            "dtype": str(DTYPE[cfg.adapter_dtype]),
        }

    base.verify_wrappers(model, targets, QAHiRALinear, expected)


def save(model, path, cfg: Config, per_module: dict[str, Config] | None = None) -> None:
    """Each module's lambda1, lambda2 and scale go with it (base.py, "per_module"); `per_module`: checked if given."""
    base.save_method(model, path, METHOD, cfg, PER_LAYER_KNOBS, per_module)


def load(model, targets: list[str], cfg: Config, path, per_module: dict[str, Config] | None = None):
    """Refuses a saved adapter whose knobs, per module too, differ from cfg and per_module (ValueError)."""
    return base.load_method(attach, model, targets, cfg, path, METHOD, PER_LAYER_KNOBS, per_module)


def merge(model):
    return base.merge_all(model)
