"""PEFT methods: one module each (peft-backed or our own), dispatched through a small table.

Every method module provides:
  Config                                    dataclass of its knobs (the `peft/` config group's keys)
  check_against_arch(cfg, shapes)           ranks that must fit, sizes that must divide, from
                                            {module: (in, out)} alone, before any weight is loaded
  attach(model, targets, cfg) -> model      add the adapters to the (quantized) target linears, freeze
                                            everything else, and verify every target got what was asked
"""

from __future__ import annotations

import importlib
from types import ModuleType

from qpeft_bench.config import ConfigError

_TABLE: dict[str, str] = {
    "lora": "qpeft_bench.adapters.lora",
}


def names() -> list[str]:
    return sorted(_TABLE)


def get(method: str) -> ModuleType:
    if method not in _TABLE:
        raise ConfigError(f"peft.method={method!r} is not implemented; available: {', '.join(names())}")
    return importlib.import_module(_TABLE[method])

