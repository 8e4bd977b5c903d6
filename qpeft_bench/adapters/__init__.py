"""PEFT methods: one module each (peft-backed or our own), dispatched through a small table.

Every method module provides:
  Config                                    dataclass of its knobs (the `peft/` config group's keys, less the
                                            common `method`, `name` and `targets`)
  check_against_arch(cfg, shapes)           ranks that must fit, sizes that must divide, from
                                            {module: (in, out)} of the adapter targets alone, before loading
  attach(model, targets, cfg[, per_module]) -> model
                                            add the adapters to the (quantized) target linears, freeze
                                            everything else, and verify every target got what was asked
  save(model, path, cfg[, per_module]) / load(model, targets, cfg, path[, per_module]) -> model
                                            adapters to a directory and back onto a freshly quantized base;
                                            the saved files keep each module's per-layer knobs, and `load`
                                            refuses (ValueError naming the module and both values) a saved
                                            adapter whose knobs differ from those asked
  merge(model) -> model                     fold the adapters into the base (raises base.MergeUnsupported
                                            saying why where there is no exact merge)
and optionally:
  PER_LAYER_KNOBS: tuple[str, ...]          knobs settable per layer group (peft.by_layer, layers.py); a
                                            method with them takes `per_module` = {module: its Config} (None
                                            or {}: cfg everywhere) in attach, save and load. `save` reads the
                                            knobs from the model; a per_module given to it is checked against
                                            them
  unsupported(quant_name, qcfg, cfg) -> str | None
                                            why this method cannot run on that quantizer (None: it can);
                                            checked at compose time and printed as the README's support matrix
  FSDP_SHARDABLE = True                     train.distributed=fsdp can train it: its trainable tensors live in
                                            modules of their own (peft's layers), default False
  FUSED_LORA = True                         train.fused_lora may replace its layers' forward by fused_lora.py's
                                            (peft's LoRA/DoRA layers only), default False
Our own adapter layers build on `adapters/base.py` (wrapper layer, verification, save format, zero-point merge).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from qpeft_bench.config import ConfigError

_TABLE: dict[str, str] = {
    "lora": "qpeft_bench.adapters.lora",  # also rslora, dora, loftq and their combinations (conf/peft/)
    "ia3": "qpeft_bench.adapters.ia3",
    "qa_lora": "qpeft_bench.adapters.qa_lora",
    "qbara": "qpeft_bench.adapters.qbara",
    "qahira": "qpeft_bench.adapters.qahira",
    "irqlora": "qpeft_bench.adapters.irqlora",
    "weak_columns": "qpeft_bench.adapters.weak_columns",
}


def names() -> list[str]:
    return sorted(_TABLE)


def get(method: str) -> ModuleType:
    if method not in _TABLE:
        raise ConfigError(f"peft.method={method!r} is not implemented; available: {', '.join(names())}")
    return importlib.import_module(_TABLE[method])


# optional members (see above) and their defaults
OPTIONAL: dict[str, object] = {"PER_LAYER_KNOBS": (), "FSDP_SHARDABLE": False, "FUSED_LORA": False}


def capability(method: str, member: str):
    """An optional flag of a method, or its default where the method module has none."""
    return getattr(get(method), member, OPTIONAL[member])


def names_where(member: str) -> tuple[str, ...]:
    """The methods whose flag `member` is set, in table order."""
    return tuple(name for name in _TABLE if capability(name, member))


def unsupported(amod: ModuleType, quant_name: str, qcfg, cfg) -> str | None:
    check = getattr(amod, "unsupported", None)
    return None if check is None else check(quant_name, qcfg, cfg)
