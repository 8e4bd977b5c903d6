"""Checks of the eval section that need what the evaluation knows: the registered task names, the model's context
and each task's own checks (the task sets' local data). The section's own shape is checked by `config.EvalConfig`;
`spec.validate` calls this once the model's architecture is known, before any model is loaded."""

from __future__ import annotations

from pathlib import Path

from qpeft_bench.config import ConfigError, EvalConfig
from qpeft_bench.evaluation.tasks import TASKS, check_names


def check_eval(ev: EvalConfig, context: int | None, model_name: str) -> None:
    """Resolve the WikiText window to the model and check what must fit its context or exist on disk."""
    check_names(ev.tasks, "eval")
    if ev.wikitext.seq_len is None:
        ev.wikitext.seq_len = min(context or 2048, 2048)
    for key, length in (("wikitext.seq_len", ev.wikitext.seq_len), ("speed.seq_len", ev.speed.seq_len)):
        if context is not None and length > context:
            raise ConfigError(f"eval.{key}={length} exceeds the context length {context} of model {model_name!r}")
    if ev.data_root is not None and not Path(ev.data_root).is_dir():
        raise ConfigError(f"eval.data_root={ev.data_root!r} is not a directory")
    for name in ev.tasks:
        if TASKS[name].check is not None:
            TASKS[name].check(ev, context, model_name)
