"""Weak-column tuning (OWQ / QEFT): train exactly the k 16-bit weak columns the quantizer kept, nothing else.

`quant=owq|qeft` store, per target linear, k input columns of the weight in 16 bits as a frozen parameter
(`WeakColumnLinear.weak`, (out, k), qpeft_bench/quant/weakcol.py); every forward reads them. Attaching unfreezes those
parameters and freezes everything else: no wrapper, no extra path at inference, nothing to merge (`merge` returns
the model as it is: the trained columns already sit in the quantized layers). Trainable parameters per layer:
k * out, with k the quantizer's `quant.k` (conf/peft/weak_columns.yaml copies it into `peft.k`, so plan mode, whose
targets are still plain nn.Linear, can count it too).

The columns are stored in the model's dtype (`adapter_dtype` follows `model.dtype` by default); adapter_dtype=float32
upcasts them for training, and the extra bytes show up as PEFT overhead.

Saved format (directory, as base.save_wrappers writes it, readable by base.read_saved): `adapter_config.json` =
{"format": base.FORMAT, "version": base.VERSION, "method": "weak_columns", "config": {...}, "targets": [...]}, and
`adapter_model.safetensors` with `<module>.weak` (the trained columns) and `<module>.weak_idx` (which input columns
they are) per target. Loading checks that the fresh base chose the same columns before copying.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from qpeft_bench import quant
from qpeft_bench.adapters import base
from qpeft_bench.config import DTYPES, ConfigError
from qpeft_bench.models import DTYPE

METHOD = "weak_columns"


@dataclass
class Config:
    # The quantizer's quant.k (the YAML interpolates it): plan mode needs it, real layers are checked against it.
    k: int | None = None
    adapter_dtype: str = "bfloat16"  # the YAML sets model.dtype: train the columns as they are stored

    def check(self, where: str) -> None:
        if self.k is not None and self.k < 0:
            raise ConfigError(f"{where}.k={self.k} must be >= 0")
        if self.adapter_dtype not in DTYPES:
            raise ConfigError(f"{where}.adapter_dtype={self.adapter_dtype!r}; choose one of {', '.join(DTYPES)}")


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    """Nothing of its own: k < in_features is the quantizer's check (quant/weakcol.py)."""


def unsupported(quant_name: str, qcfg, cfg: Config) -> str | None:
    if not quant.capability(quant_name, "WEAK_COLUMNS"):
        return f"only {' and '.join(quant.names_where('WEAK_COLUMNS'))} keep 16-bit weak columns to train"
    if cfg.k != qcfg.k:
        return (
            f"peft.k={cfg.k} differs from quant.k={qcfg.k}: k comes from the quantizer; set quant.k and leave "
            "peft.k to follow it"
        )
    if qcfg.k == 0:
        return "quant.k=0 keeps no weak column to train"
    return None


def _plan_stand_in(layer: nn.Linear, k: int, dtype: torch.dtype) -> None:
    """Plan mode: split a meta nn.Linear's weight as OWQ/QEFT store it, (out, in - k) frozen and (out, k) weak, so
    the counts equal a quantized model's (k * out trainable, no bytes added in the model's dtype)."""
    out_f, in_f = layer.weight.shape
    layer.weight = nn.Parameter(
        torch.empty(out_f, in_f - k, device="meta", dtype=layer.weight.dtype), requires_grad=False
    )
    layer.weak = nn.Parameter(torch.empty(out_f, k, device="meta", dtype=dtype))


def attach(model, targets: list[str], cfg: Config):
    dtype = DTYPE[cfg.adapter_dtype]
    weak_formats = [quant.get(q) for q in quant.names_where("WEAK_COLUMNS")]
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        layer = model.get_submodule(name)
        if quant.owner(layer) in weak_formats:
            if layer.weak.dtype != dtype:  # the layer casts the columns to its compute dtype in the forward
                layer.weak.data = layer.weak.data.to(dtype)
        elif type(layer) is nn.Linear and layer.weight.is_meta and cfg.k is not None:
            _plan_stand_in(layer, cfg.k, dtype)
        else:
            raise ConfigError(
                f"{name} is a {type(layer).__name__}, which holds no weak columns: weak-column tuning "
                f"needs quant={' or quant='.join(quant.names_where('WEAK_COLUMNS'))}"
            )
        layer.weak.requires_grad_(True)
    verify(model, targets, cfg)
    return model


def verify(model, targets: list[str], cfg: Config) -> None:
    """Exactly the targets' weak columns train, each with the k columns and the dtype asked for."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {f"{t}.weak" for t in targets}
    if trainable != want:
        raise RuntimeError(
            f"trainable parameters are not the targets' weak columns: missing "
            f"{sorted(want - trainable)[:3]}, unexpected {sorted(trainable - want)[:3]}"
        )
    for name in targets:
        weak = model.get_submodule(name).weak
        got = {"k": weak.shape[1], "dtype": weak.dtype}
        asked = {"k": weak.shape[1] if cfg.k is None else cfg.k, "dtype": DTYPE[cfg.adapter_dtype]}
        if got != asked:
            raise RuntimeError(f"{name}: weak columns have {got}, asked for {asked}")


def _targets(model) -> list[str]:
    return sorted(
        n.removesuffix(".weak") for n, p in model.named_parameters() if n.endswith(".weak") and p.requires_grad
    )


def save(model, path, cfg: Config) -> None:
    targets = _targets(model)
    tensors = {}
    for name in targets:
        layer = model.get_submodule(name)
        tensors[f"{name}.weak"], tensors[f"{name}.weak_idx"] = layer.weak, layer.weak_idx
    base.save_tensors(path, METHOD, dataclasses.asdict(cfg), targets, tensors)


def load(model, targets: list[str], cfg: Config, path):
    meta, tensors = base.read_saved(path, METHOD)
    base.check_saved(meta, targets, dataclasses.asdict(cfg))
    model = attach(model, targets, cfg)
    with torch.no_grad():
        for name in targets:
            layer = model.get_submodule(name)
            idx, weak = tensors[f"{name}.weak_idx"], tensors[f"{name}.weak"]
            # columns trained for other indices would silently land on the wrong inputs
            if not torch.equal(idx.cpu(), layer.weak_idx.cpu()):
                raise ValueError(
                    f"{path}: {name} was saved for weak columns {idx[:4].tolist()}..., the base keeps "
                    f"{layer.weak_idx[:4].tolist()}...: not the same quantized base"
                )
            if weak.shape != layer.weak.shape:
                raise ValueError(f"{name}: saved shape {tuple(weak.shape)}, model has {tuple(layer.weak.shape)}")
            layer.weak.copy_(weak.to(layer.weak.device, layer.weak.dtype))
    return model


def merge(model):
    """Nothing to fold: the trained columns are part of the quantized layers and there is no extra path."""
    return model
