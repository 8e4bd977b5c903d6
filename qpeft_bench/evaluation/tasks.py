"""The evaluation task registry: one frozen `EvalTask` per name that `eval.tasks` accepts, as lm-eval keeps a task
as one YAML file. A definition says everything the rest of the tool asks about a task: its protocol label (written
to the record's `eval.protocols`), how it runs (a function of the model and an `EvalContext`, which carries the
typed `EvalConfig`), its headline metric (summaries), whether the quantized base runs it too, what its result
depends on (the base-result cache's key), the checks it needs before any model loads (local data, context), the
summary's label, and for an lm-eval task set the set itself (`LmEvalSet`: tasks, shots, metrics, averages, where
lm-eval keeps their YAML).

The definitions are registered in `qpeft_bench/evaluation/__init__.py`, beside their runners, and every consumer
(the config check, `evaluate()`, the protocol labels, the base cache, the run summaries, the report) reads `TASKS`.
Python imports a package's `__init__` before any of its modules, so `TASKS` is complete wherever this module is
imported. No torch and no lm-eval here: the report reads the registry without them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from qpeft_bench.config import ConfigError, EvalConfig


class TaskSpec(NamedTuple):
    """One entry of an lm-eval task set: an lm-eval task or group name, its n-shot, and the metric we report."""

    task: str
    num_fewshot: int
    metric: str
    filter: str = "none"  # the lm-eval filter pipeline whose output is scored ("none": the raw output)


@dataclass(frozen=True)
class LmEvalSet:
    """An lm-eval task set (evaluation/harness.py runs it): its entries, its averages over entry names, and the
    folder under lm_eval/tasks that holds each entry's YAML (indexing only those folders keeps lm-eval's start
    fast; the local data a run reads follows from those YAMLs)."""

    tasks: tuple[TaskSpec, ...]
    averages: dict[str, tuple[str, ...]]
    dirs: dict[str, str]


@dataclass(frozen=True)
class EvalContext:
    """What a runner gets beside the model: the run's stage ("before"/"after"), where and how it runs, the held-out
    batches (a fresh iterator per call) and the typed eval section."""

    tokenizer: Any
    stage: str
    device: str
    compute_dtype: Any
    progress: bool
    heldout_batches: Callable[[], Any]
    config: EvalConfig


@dataclass(frozen=True)
class EvalTask:
    name: str
    protocol: str  # the label written to eval.protocols: what the number means
    run: Callable[[Any, EvalContext], Any]  # (model, context) -> the result (JSON-serialisable)
    metric: str | None = None  # the result's key holding the headline number; None: a bare number, or no headline
    before: bool = True  # the quantized base runs it too; False: after fine-tuning only
    settings: Callable[[EvalConfig], dict] | None = None  # what its result depends on beyond the base (cache key)
    check: Callable[[EvalConfig, int | None, str], None] | None = None  # (eval, context, model name), before loading
    summary: tuple[str, str] | None = None  # (label, number format) in the run's summary table
    lm_eval: LmEvalSet | None = None  # an lm-eval task set

    def headline(self, result) -> float | None:
        """The one number of a result for summaries and tables: a perplexity, or the task set's average."""
        if result is None or isinstance(result, (int, float)):
            return result
        return result.get(self.metric) if self.metric else None

    def valid(self, result) -> bool:
        """Whether `result` has this task's shape: a mapping when the task has a metric, and a finite headline
        number when it has one (what a stored result must satisfy before it is trusted)."""
        if self.metric is not None and not isinstance(result, dict):
            return False
        if isinstance(result, bool) or not isinstance(result, (int, float, dict)):
            return False
        value = self.headline(result)
        if self.metric is None and not isinstance(result, (int, float)):
            return True  # a result without a headline (speed): its shape is the runner's
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


TASKS: dict[str, EvalTask] = {}


def register(task: EvalTask) -> EvalTask:
    if task.name in TASKS:
        raise ValueError(f"eval task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task


def check_names(tasks: list[str], where: str) -> None:
    """Every name in `tasks` is a registered task."""
    for task in tasks:
        if task not in TASKS:
            raise ConfigError(f"{where}.tasks: unknown task {task!r}; available: {', '.join(TASKS)}")


def lm_eval_sets() -> dict[str, LmEvalSet]:
    """The registered lm-eval task sets by name, in registration order."""
    return {name: t.lm_eval for name, t in TASKS.items() if t.lm_eval is not None}
