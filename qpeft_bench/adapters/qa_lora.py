"""QA-LoRA (Xu et al.): y = Q(W) x + s · B A pool_L(x), s = alpha / r.

pool_L averages each group of L consecutive input features, so A is r × (in / L) and B is out × r. L equals the
base quantizer's group size: the update dW[o, j] = s (B A)[o, j // L] / L is then constant over every quantization
group of a row, and `merge` folds it into the group zero points exactly (base.merge_group_constant). The merged
model is the quantized model itself, with no extra path and no extra bytes. That needs a format with a zero point
per group of inputs: rtn, gptq, and hqq with axis=1.

Dropout acts on the pooled input, as in the authors' code (in / L features to drop instead of in). A is
initialised Xavier-uniform as in the authors' code (yuhuixu1993/qa-lora, peft_utils.py, GPTQLoraLinear.
reset_lora_parameters: their lora_A is an nn.Linear(in / L, r), so the bound is √(6 / (in / L + r))); `init_a:
kaiming_uniform` gives LoRA's A init instead (a = √5, fan-in in / L, bound 1 / √(in / L)). B starts at zero, so
the adapted model starts as the quantized base. r and alpha can differ per layer group (peft.by_layer), L cannot.
Saved in base.py's versioned adapter format (tensors `<module>.adapter.A` / `.B`, each module's r and alpha in
"per_module"). docs/fidelity/qa_lora.md compares it with the reference.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qpeft_bench import quant
from qpeft_bench.adapters import base
from qpeft_bench.config import DTYPES, ConfigError, positive
from qpeft_bench.models import DTYPE

METHOD = "qa_lora"
INIT_A = ("xavier_uniform", "kaiming_uniform")


@dataclass
class Config:
    r: int = 8
    alpha: float = 16
    group_size: int = 64  # L: must equal quant.group_size so that the update folds into the zero points
    dropout: float = 0.05
    adapter_dtype: str = "bfloat16"  # as LoRA's: what qlora.py trains in and what the overhead tables count
    # A's initial draw. xavier_uniform: the authors' code (reset_lora_parameters in their peft_utils.py), bound
    # √(6 / (in / L + r)); kaiming_uniform: LoRA's A (a = √5, bound 1 / √(in / L)), ~2x smaller at LLaMA-7B shapes.
    init_a: typing.Literal["xavier_uniform", "kaiming_uniform"] = "xavier_uniform"

    def check(self, where: str) -> None:
        positive(where, "r", self.r)
        positive(where, "alpha", self.alpha)
        positive(where, "group_size", self.group_size)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout={self.dropout} must lie in [0, 1)")
        if self.adapter_dtype not in DTYPES:
            raise ConfigError(f"{where}.adapter_dtype={self.adapter_dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.init_a not in INIT_A:
            raise ConfigError(f"{where}.init_a={self.init_a!r}; choose one of {', '.join(INIT_A)}")


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    # No rank cap as in LoRA: r > in / L is wasteful but well defined, and small models reach it at sane L.
    base.check_divides("peft.group_size", cfg.group_size, shapes, sides="in")


def unsupported(quant_name: str, qcfg, cfg: Config) -> str | None:
    if quant.capability(quant_name, "WEAK_COLUMNS"):
        return "QA-LoRA merges into the group zero points, which the 16-bit weak columns bypass"
    if not quant.capability(quant_name, "GROUP_ZERO_POINTS"):
        have = ", ".join(quant.names_where("GROUP_ZERO_POINTS"))
        return f"QA-LoRA merges into per-group zero points, which only {have} have"
    if getattr(qcfg, "axis", 1) != 1:  # hqq's axis=0 groups run along the outputs
        return "QA-LoRA needs groups along the inputs (quant.axis=1)"
    if qcfg.group_size != cfg.group_size:
        return (
            f"peft.group_size={cfg.group_size} must equal quant.group_size={qcfg.group_size}: the update is "
            "constant over L inputs and folds into the zero points only when those L are one quantization group"
        )
    return None


class QALoRALinear(base.AdapterLinear):
    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        group_size: int,
        dropout: float,
        dtype: torch.dtype,
        init_a: str = "xavier_uniform",
    ):
        super().__init__(base_layer)
        if self.in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={self.in_features}")
        quant_group = base.group_size_of(base_layer)
        if quant_group is not None and quant_group != group_size:
            raise ValueError(
                f"group_size={group_size} differs from the base layer's quantization groups of {quant_group} inputs"
            )
        self.r, self.alpha, self.group_size = r, alpha, group_size
        self.scale = alpha / r
        device = base.device_of(base_layer)
        # Drawn in fp32 and then cast (the authors' code casts its fp32 lora_A to bf16 the same way), so every
        # adapter dtype starts from the same draw. A is (r, in / L) like their nn.Linear(in / L, r).weight.
        a = torch.empty(r, self.in_features // group_size, device=device)
        if init_a == "xavier_uniform":
            nn.init.xavier_uniform_(a)
        elif init_a == "kaiming_uniform":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            raise ValueError(f"init_a={init_a!r}; choose one of {', '.join(INIT_A)}")
        b = torch.zeros(self.out_features, r, device=device)
        self.adapter = nn.ParameterDict({"A": nn.Parameter(a.to(dtype)), "B": nn.Parameter(b.to(dtype))})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.adapter["A"], self.adapter["B"]
        # Cast, then pool, as the authors' forward (x.type_as(lora_A.weight), then qa_pool): pooling an fp32 input
        # before the cast to a bf16 A would round 42% of the pooled features differently (1 bf16 ulp).
        pooled = self.dropout(base.avg_pool(x.to(a.dtype), self.group_size))
        return F.linear(F.linear(pooled, a), b) * self.scale

    def describe(self) -> dict:
        return {
            "r": self.adapter["A"].shape[0],
            "scale": self.scale,
            "group_size": self.group_size,
            "dtype": self.adapter["A"].dtype,
        }

    def group_delta(self) -> torch.Tensor:
        """dW per (output, input group), (out, in / L) in fp32: the pooling's 1 / L included."""
        b, a = self.adapter["B"].detach().float(), self.adapter["A"].detach().float()
        return self.scale * (b @ a) / self.group_size

    def merge(self) -> nn.Module:
        return base.merge_group_constant(self.base, self.group_delta())


# group_size is not among them: it must equal the quantizer's group size (the merge folds the update into the
# quantization groups' zero points), and the quantizer uses one group size for every layer, so it is global.
PER_LAYER_KNOBS = ("r", "alpha")  # settable per layer group (peft.by_layer; qpeft_bench/layers.py)


def attach(model, targets: list[str], cfg: Config, per_module: dict[str, Config] | None = None):
    """`per_module`: {module: Config} with per-layer-group r/alpha (peft.by_layer)."""
    dtype = DTYPE[cfg.adapter_dtype]

    def make(name: str, layer: nn.Module, c: Config) -> QALoRALinear:
        try:
            return QALoRALinear(layer, c.r, c.alpha, c.group_size, c.dropout, dtype, c.init_a)
        except ValueError as err:
            raise ConfigError(f"{name} ({layer.in_features} -> {layer.out_features}): peft.{err}") from err

    base.attach_method(model, targets, cfg, per_module, PER_LAYER_KNOBS, make)
    verify(model, targets, cfg, per_module)
    return model


def verify(model, targets: list[str], default: Config, per_module: dict[str, Config] | None = None) -> None:
    def expected(name: str) -> dict:
        cfg = (per_module or {}).get(name, default)
        return {"r": cfg.r, "scale": cfg.alpha / cfg.r, "group_size": cfg.group_size, "dtype": DTYPE[cfg.adapter_dtype]}

    base.verify_wrappers(model, targets, QALoRALinear, expected)


def save(model, path, cfg: Config, per_module: dict[str, Config] | None = None) -> None:
    """Each module's r and alpha go with it (base.py, "per_module"); `per_module`: checked if given."""
    base.save_method(model, path, METHOD, cfg, PER_LAYER_KNOBS, per_module)


def load(model, targets: list[str], cfg: Config, path, per_module: dict[str, Config] | None = None):
    """Refuses a saved adapter whose knobs, per module too, differ from cfg and per_module (ValueError): alpha
    changes the outputs without changing a shape, so the tensors alone could not catch a mismatch."""
    return base.load_method(attach, model, targets, cfg, path, METHOD, PER_LAYER_KNOBS, per_module)


def merge(model):
    return base.merge_all(model)
