"""IR-QLoRA's Information Elastic Connection (IEC, Qin et al. 2024): LoRA plus two parameter-free connections.

With x (..., in), A (r, in), B (out, r), scalars beta1 and beta2 (both zero at the start) and s = alpha / r:

    u  = A dropout(x) + beta1 * avg_pool(x, in / r)           (..., r)
    dy = s * (B u + beta2 * repeat(u, out / r))               (..., out)

Source for the two connections: the authors' code, htqin/IR-QLoRA `utils.py`, `IRQLoraLinear4bit.forward`:
- "mean of x over r groups" is `x.reshape(..., r, in / r).mean(-1)`: r groups of in / r *consecutive* input
  features, one mean each (base.avg_pool with size in / r);
- "u repeated over out / r groups" is `(B u).reshape(..., r, out / r) + beta2 * u[..., None]`, flattened: u_i is
  added to the i-th block of out / r consecutive outputs, i.e. repeat-interleave (base.repeat), not tiling;
- dropout acts on A's input only; the mean reads the un-dropped x, as there;
- beta1 and beta2 are one-element parameters in the adapter dtype, initialised to 0; A is initialised like peft's
  LoRA A (Kaiming-uniform, a = sqrt(5)), which the authors' NF4 code inherits from peft, and B at zero. The adapted
  model therefore starts as the quantized base.
Both groupings need in % r == 0 and out % r == 0 (checked at compose time, naming the layer and its sizes).

Trainable parameters per layer: r * in + out * r + 2. The paper pairs IEC with its ICQ quantizer (`quant=icq`), but
IEC only reads the layer's input and adds to its output, so it runs on every quantizer.

Merge: IEC is linear in x. With P (r, in) the group-mean matrix (P[i, j] = r / in where j lies in group i) and
R (out, r) the repeat matrix (R[o, i] = 1 where o lies in block i), u = (A + beta1 P) x at inference (dropout off)
and dy = s (B + beta2 R) u, so dW = s (B + beta2 R)(A + beta1 P) exactly. It is added to the dequantized base
(base.merge_dense), giving a plain nn.Linear in the dtype the base dequantizes to.

r and alpha can differ per layer group (peft.by_layer); r must then divide in and out of each module of its group.

Saved format: base.save_method (adapter_config.json with format, version, method "irqlora", the config and the
per-module r/alpha; adapter_model.safetensors with `<module>.adapter.A`, `.B`, `.beta1`, `.beta2`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qpeft_bench.adapters import base, lora
from qpeft_bench.config import ConfigError
from qpeft_bench.models import DTYPE

METHOD = "irqlora"


@dataclass
class Config(lora.Config):
    """LoRA's knobs (r, alpha, dropout, adapter_dtype) and their checks: IEC adds two scalars, not knobs."""


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    # u is averaged over r input groups and repeated over r output blocks: both must be whole
    base.check_divides("peft.r", cfg.r, shapes, sides="in,out")


def unsupported(quant_name: str, qcfg, cfg: Config) -> str | None:
    """None for every quantizer: IEC reads the layer's input and adds to its output, whatever the base."""
    return None


def eye_repeated(r: int, times: int) -> torch.Tensor:
    """(r, r * times): row i is 1 on the i-th block of `times` consecutive columns (base.repeat of the identity)."""
    return base.repeat(torch.eye(r), times)


class IECLinear(base.AdapterLinear):
    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, dtype: torch.dtype):
        super().__init__(base_layer)
        if self.in_features % r or self.out_features % r:
            raise ValueError(
                f"r={r} does not divide in_features={self.in_features} or out_features={self.out_features}"
            )
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        device = base.device_of(base_layer)
        a = torch.empty(r, self.in_features, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # in fp32, so the draw does not depend on the adapter dtype
        self.adapter = nn.ParameterDict(
            {
                "A": nn.Parameter(a.to(dtype)),
                "B": nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype)),
                "beta1": nn.Parameter(torch.zeros(1, device=device, dtype=dtype)),
                "beta2": nn.Parameter(torch.zeros(1, device=device, dtype=dtype)),
            }
        )
        self.dropout = base.dropout_layer(dropout)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        p = self.adapter
        x = x.to(p["A"].dtype)
        u = F.linear(self.dropout(x), p["A"]) + p["beta1"] * base.avg_pool(x, self.in_features // self.r)
        return self.scale * (F.linear(u, p["B"]) + p["beta2"] * base.repeat(u, self.out_features // self.r))

    def describe(self) -> dict:
        p = self.adapter
        return {
            "r": p["A"].shape[0],
            "r_B": p["B"].shape[1],
            "scale": self.scale,
            "dtype": p["A"].dtype,
            "betas": (p["beta1"].numel(), p["beta2"].numel()),
        }

    def delta_weight(self) -> torch.Tensor:
        """dW (out, in) in fp32 with dW x equal to the adapter's output at inference."""
        p = {k: v.detach().float() for k, v in self.adapter.items()}
        g_in, g_out = self.in_features // self.r, self.out_features // self.r
        pool = eye_repeated(self.r, g_in).to(p["A"].device) / g_in  # P: u_i = mean of input group i
        rep = eye_repeated(self.r, g_out).T.to(p["A"].device)  # R: output o reads u_{o // g_out}
        return self.scale * (p["B"] + p["beta2"] * rep) @ (p["A"] + p["beta1"] * pool)

    def merge(self) -> nn.Module:
        dtype = base.dense_weight(self.base).dtype  # keep the precision the base computed with
        return base.merge_dense(self.base, self.delta_weight(), dtype=dtype)


PER_LAYER_KNOBS = ("r", "alpha")  # settable per layer group (peft.by_layer; qpeft_bench/layers.py)


def attach(model, targets: list[str], cfg: Config, per_module: dict[str, Config] | None = None):
    """`per_module`: {module: Config} with per-layer-group r/alpha (peft.by_layer)."""
    dtype = DTYPE[cfg.adapter_dtype]

    def make(name: str, layer: nn.Module, c: Config) -> IECLinear:
        try:
            return IECLinear(layer, c.r, c.alpha, c.dropout, dtype)
        except ValueError as err:  # check_against_arch catches this at compose time; a hand-made call lands here
            raise ConfigError(f"{name} ({layer.in_features} -> {layer.out_features}): peft.{err}") from err

    base.attach_method(model, targets, cfg, per_module, PER_LAYER_KNOBS, make)
    verify(model, targets, cfg, per_module)
    return model


def verify(model, targets: list[str], default: Config, per_module: dict[str, Config] | None = None) -> None:
    def expected(name: str) -> dict:
        cfg = (per_module or {}).get(name, default)
        return {
            "r": cfg.r,
            "r_B": cfg.r,
            "scale": cfg.alpha / cfg.r,
            "dtype": DTYPE[cfg.adapter_dtype],
            "betas": (1, 1),
        }

    base.verify_wrappers(model, targets, IECLinear, expected)


def save(model, path, cfg: Config, per_module: dict[str, Config] | None = None) -> None:
    """Each module's r and alpha go with it (base.py, "per_module"); `per_module`: checked if given."""
    base.save_method(model, path, METHOD, cfg, PER_LAYER_KNOBS, per_module)


def load(model, targets: list[str], cfg: Config, path, per_module: dict[str, Config] | None = None):
    """Refuses a saved adapter whose knobs, per module too, differ from cfg and per_module (ValueError)."""
    return base.load_method(attach, model, targets, cfg, path, METHOD, PER_LAYER_KNOBS, per_module)


def merge(model):
    return base.merge_all(model)
