"""Checks of the eval section that need what the evaluation knows: the model's context and the task sets' local
data. The section's own shape is checked by `config.EvalConfig`; `spec.validate` calls this once the model's
architecture is known, before any model is loaded."""

from __future__ import annotations

from pathlib import Path

from qpeft_bench.config import ConfigError, EvalConfig
from qpeft_bench.evaluation import harness


def check_eval(ev: EvalConfig, context: int | None, model_name: str) -> None:
    """Resolve the WikiText window to the model and check what must fit its context or exist on disk."""
    if ev.wikitext.seq_len is None:
        ev.wikitext.seq_len = min(context or 2048, 2048)
    for key, length in (("wikitext.seq_len", ev.wikitext.seq_len), ("speed.seq_len", ev.speed.seq_len)):
        if context is not None and length > context:
            raise ConfigError(f"eval.{key}={length} exceeds the context length {context} of model {model_name!r}")
    if "speed" in ev.tasks and context is not None and ev.speed.new_tokens >= context:
        raise ConfigError(
            f"eval.speed.new_tokens={ev.speed.new_tokens} does not fit the context length {context} "
            f"of model {model_name!r} with a prompt"
        )
    if ev.data_root is not None and not Path(ev.data_root).is_dir():
        raise ConfigError(f"eval.data_root={ev.data_root!r} is not a directory")
    for task_set in (t for t in ev.tasks if t in harness.TASK_SETS):
        harness.check_local_data(task_set, ev.data_root)  # local files named before any model is loaded
