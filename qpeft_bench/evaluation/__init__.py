"""Evaluation tasks (the `eval/` config group) on the in-memory model: each task's definition, registered in
`tasks.TASKS`, and `evaluate`, which runs a run's tasks through them.

Tasks:
  ppl_heldout    exp(mean token NLL) over the labelled tokens of the fine-tuning data's validation split
  ppl_wikitext   windowed token perplexity of a WikiText-style test split (perplexity.py; the GPTQ/SmoothQuant/QEFT
                 protocol, not lm-eval's document-level word perplexity, so it carries its own label)
  mmlu, commonsense, leaderboard
                 lm-eval task sets on the in-memory model (harness.py)
  speed          generated tokens/s and forward/backward ms of one step (throughput.py); after fine-tuning only

`evaluate` runs a list of them on one model and returns {task: result}; `ppl_heldout` stays a bare float (the
record's original key), every other task a dict. Beside the results, each task but speed gives its per-item results
(items.py: per example, window or document), which go to the run's items file, not into the record. The quantized base's results ("before") do not depend on the
PEFT method, its seed or the training settings, so a sweep computes them once: `BaseEvalCache` (cache.py) keeps
them on disk per (model, quantizer, calibration, data split, compute dtype, device kind, task settings).

The runners import their engines (torch, lm-eval) when they run, so the registry loads without them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpeft_bench.config import ConfigError, EvalConfig
from qpeft_bench.evaluation import coverage
from qpeft_bench.evaluation.cache import BaseEvalCache
from qpeft_bench.evaluation.items import ItemsError, check_task, mismatch, nll_items
from qpeft_bench.evaluation.tasks import TASKS, EvalContext, EvalTask, LmEvalSet, TaskSpec, register

log = logging.getLogger("qpeft_bench")


def wikitext_source(
    path: str | None, data_root: str | None, hub_id: str, variant: str | None, split: str
) -> str | None:
    """The local WikiText file to read: the explicit path, else <data_root>/<hub_id>/<variant>/<split>.jsonl (the
    harness's layout), else None (the hub)."""
    root = data_root or os.environ.get("QPEFT_EVAL_DATA")
    if path is not None or root is None:
        return path
    local = Path(root) / hub_id / (variant or "default") / f"{split}.jsonl"
    if not local.is_file():
        raise FileNotFoundError(
            f"ppl_wikitext: {local} does not exist (eval.data_root / $QPEFT_EVAL_DATA is set); "
            "put the split there or set eval.wikitext.path"
        )
    return str(local)


# ----------------------------------------------------------------------------------------------------------------
# Runners: (model, EvalContext) -> result
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WithItems:
    """A runner's return with its per-item results (items.py), which `evaluate` hands on apart from the record."""

    out: Any  # what the runner returns otherwise: the result, or a coverage.Covered
    items: dict


def _run_heldout(model, ctx: EvalContext) -> WithItems:
    from qpeft_bench.evaluation import perplexity

    batches = ctx.heldout_batches()
    seen = 0

    def counted():
        nonlocal seen
        for batch in batches:
            seen += 1
            yield batch

    out = perplexity.heldout_perplexity(
        model,
        counted(),
        ctx.device,
        ctx.compute_dtype,
        ctx.progress,
        f"{ctx.stage}: ppl_heldout",
        total=len(batches) if hasattr(batches, "__len__") else None,
    )
    cap, available = ctx.config.max_batches, getattr(batches, "available", None)
    if available is not None:  # the recipe's batches know how many the split has: limited only if the cap cut it
        cut = [f"eval.max_batches={cap} of {available} batches"] if cap and available > cap else []
    else:  # capped batches of unknown origin: a cap that was reached may or may not have cut the split
        cut = [f"eval.max_batches={cap} batches"] if cap and seen >= cap else []
    units = out["units"]  # ids: the examples' indices in the validation split (eval_stage's batches carry them)
    return WithItems(coverage.Covered(out["ppl"], coverage.entry(cut)), nll_items("example", **units))


def _run_wikitext(model, ctx: EvalContext) -> WithItems:
    from qpeft_bench.evaluation import perplexity

    ev, w = ctx.config, ctx.config.wikitext
    source = wikitext_source(w.path, ev.data_root, w.hub_id, w.variant, w.split)
    text = perplexity.wikitext_text(source, w.hub_id, w.variant, w.split)
    out = perplexity.windowed_perplexity(
        model,
        ctx.tokenizer,
        text,
        seq_len=w.seq_len,
        batch_size=ev.batch_size,
        device=ctx.device,
        compute_dtype=ctx.compute_dtype,
        progress=ctx.progress,
        max_windows=w.max_windows,
    )
    out["source"] = source or f"{w.hub_id}/{w.variant}"
    units = out.pop("units")
    cut = out["windows"] < out["windows_total"]
    limits = [f"eval.wikitext.max_windows={w.max_windows} of {out['windows_total']} windows"] if cut else []
    return WithItems(
        coverage.Covered(out, coverage.entry(limits, coverage.shipped(source))), nll_items("window", **units)
    )


def _run_task_set(task_set: str, model, ctx: EvalContext) -> WithItems:
    from qpeft_bench.evaluation import harness

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown the run's log
    h, items = ctx.config.harness, {}
    out = harness.run_task_set(
        model,
        ctx.tokenizer,
        task_set,
        batch_size=h.batch_size,
        data_root=ctx.config.data_root,
        limit=h.limit,
        device=ctx.device,
        compute_dtype=ctx.compute_dtype,
        max_gen_toks=h.max_gen_toks,
        progress=ctx.progress,
        items=items,
    )
    entries = out["tasks"].values()
    cut = any(e["samples"] < e["samples_total"] for e in entries)
    covered = coverage.Covered(
        out,
        coverage.entry(
            [f"eval.harness.limit={h.limit} items per task"] if cut else [],
            coverage.shipped(out["data"].get("root")),
            sum(e["truncated"] for e in entries),
        ),
    )
    return WithItems(covered, items)


def _check_task_set(task_set: str, ev: EvalConfig, context: int | None, model_name: str) -> None:
    from qpeft_bench.evaluation import harness, local_data

    root = harness.check_local_data(task_set, ev.data_root)  # missing local files named before any model is loaded
    if root is not None:
        local_data.check_rows(task_set, root)  # and the first rows of each read as the task will read them


def _run_speed(model, ctx: EvalContext) -> dict:
    from qpeft_bench.evaluation import throughput

    s = ctx.config.speed
    return {
        "generation": throughput.generation_speed(
            model,
            ctx.tokenizer,
            new_tokens=s.new_tokens,
            repeats=s.repeats,
            device=ctx.device,
            compute_dtype=ctx.compute_dtype,
        ),
        "step": throughput.step_speed(
            model,
            seq_len=s.seq_len,
            batch_size=s.batch_size,
            repeats=s.repeats,
            device=ctx.device,
            compute_dtype=ctx.compute_dtype,
            gradient_checkpointing=s.gradient_checkpointing,
        ),
    }


def _check_wikitext(ev: EvalConfig, context: int | None, model_name: str) -> None:
    """The local WikiText file, found and read whole before any model is loaded (a few MB: its text is what the
    task evaluates, so a file in another schema or an empty one fails here, not after quantization or training)."""
    from qpeft_bench.evaluation import perplexity

    w = ev.wikitext
    try:
        source = wikitext_source(w.path, ev.data_root, w.hub_id, w.variant, w.split)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from err
    if source is None:
        return  # the hub through `datasets`, read when the task runs
    try:
        text = perplexity.wikitext_text(source, w.hub_id, w.variant, w.split)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"ppl_wikitext: {source} cannot be read as WikiText ({type(err).__name__}: {err})") from err
    if not text.strip():
        raise ConfigError(f"ppl_wikitext: {source} holds no text")


def _check_speed(ev: EvalConfig, context: int | None, model_name: str) -> None:
    if context is not None and ev.speed.new_tokens >= context:
        raise ConfigError(
            f"eval.speed.new_tokens={ev.speed.new_tokens} does not fit the context length {context} "
            f"of model {model_name!r} with a prompt"
        )


def _harness_settings(ev: EvalConfig) -> dict:
    return {**dataclasses.asdict(ev.harness), "data_root": ev.data_root}


def _task_set(name: str, protocol: str, label: str, lm_eval: LmEvalSet) -> EvalTask:
    """An lm-eval task set: harness.py runs it; its headline is its `average`."""
    return EvalTask(
        name,
        protocol,
        run=functools.partial(_run_task_set, name),
        metric="average",
        settings=_harness_settings,
        check=functools.partial(_check_task_set, name),
        summary=(label, ".4f"),
        lm_eval=lm_eval,
    )


# ----------------------------------------------------------------------------------------------------------------
# The tasks, in the order `eval.tasks`'s error message lists them
# ----------------------------------------------------------------------------------------------------------------

COMMONSENSE = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")
# Where each lm-eval task's YAML lives under lm_eval/tasks (the names resolve to the same files as lm-eval's full
# index; tests/test_harness.py checks it, marked slow).
_DIRS = {
    "mmlu": "mmlu/default",
    "hellaswag": "hellaswag",
    "piqa": "piqa",
    "winogrande": "winogrande",
    "arc_easy": "arc",
    "arc_challenge": "arc",
    "boolq": "super_glue/boolq",
    "openbookqa": "openbookqa",
    "truthfulqa_mc2": "truthfulqa",
    "gsm8k": "gsm8k",
}
_LEADERBOARD = (
    TaskSpec("mmlu", 5, "acc"),
    TaskSpec("hellaswag", 10, "acc_norm"),
    TaskSpec("arc_challenge", 25, "acc_norm"),
    TaskSpec("truthfulqa_mc2", 0, "acc"),  # lm-eval's process_results_mc2 reports the mc2 score as "acc"
    TaskSpec("winogrande", 5, "acc"),
    TaskSpec("gsm8k", 5, "exact_match", "strict-match"),
)
_COMMONSENSE = tuple(TaskSpec(t, 0, "acc_norm" if t in ("hellaswag", "arc_challenge") else "acc") for t in COMMONSENSE)


def _sets_dirs(specs: tuple[TaskSpec, ...]) -> dict[str, str]:
    return {s.task: _DIRS[s.task] for s in specs}


register(
    EvalTask(
        "ppl_heldout",
        "exp(mean token NLL) over the labelled tokens of the validation split of the fine-tuning data",
        run=_run_heldout,
        settings=lambda ev: {"max_batches": ev.max_batches},
        summary=("held-out ppl", ".3f"),
    )
)
register(
    EvalTask(
        "ppl_wikitext",
        "windowed token perplexity, non-overlapping windows, joined with blank lines",
        run=_run_wikitext,
        metric="ppl",
        settings=lambda ev: {**dataclasses.asdict(ev.wikitext), "data_root": ev.data_root},
        check=_check_wikitext,
        summary=("WikiText ppl (windows)", ".3f"),
    )
)
register(
    _task_set(
        "mmlu",
        "lm-eval mmlu, 5-shot, test split, shots from dev, unweighted mean of the 57 subject accuracies",
        "MMLU 5-shot acc",
        LmEvalSet((TaskSpec("mmlu", 5, "acc"),), {"average": ("mmlu",)}, {"mmlu": _DIRS["mmlu"]}),
    )
)
register(
    _task_set(
        "commonsense",
        "lm-eval 0-shot hellaswag (acc_norm), piqa, winogrande, arc_easy, arc_challenge (acc_norm), "
        "boolq, openbookqa (acc); unweighted average",
        "commonsense 0-shot avg",
        LmEvalSet(_COMMONSENSE, {"average": COMMONSENSE}, _sets_dirs(_COMMONSENSE)),
    )
)
register(
    _task_set(
        "leaderboard",
        "lm-eval Open LLM Leaderboard v1 shots; 6-task and 4-task (ARC-c, HellaSwag, MMLU, TruthfulQA) averages",
        "leaderboard avg (6 / 4)",
        LmEvalSet(
            _LEADERBOARD,
            {
                "average": ("mmlu", "hellaswag", "arc_challenge", "truthfulqa_mc2", "winogrande", "gsm8k"),
                "average_4": ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"),
            },
            _sets_dirs(_LEADERBOARD),
        ),
    )
)
register(
    EvalTask(
        "speed",
        "greedy tokens/s at batch 1 (median after a warm-up); forward and backward ms of one training step",
        run=_run_speed,
        before=False,  # the speed of the model a run ships; the base's would measure no adapter path
        check=_check_speed,
    )
)

# Views of the registry that callers read
PROTOCOLS = {name: t.protocol for name, t in TASKS.items()}
AFTER_ONLY = tuple(name for name, t in TASKS.items() if not t.before)
SUMMARIES = tuple((name, *t.summary) for name, t in TASKS.items() if t.summary)  # (task, label, format)


def headline(result, task: str) -> float | None:
    """The one number of `task`'s result for summaries and tables: a perplexity, or the task set's average."""
    return TASKS[task].headline(result)


def cache_settings(ev: EvalConfig) -> dict[str, dict]:
    """{task: the settings its base result depends on} for BaseEvalCache."""
    return {name: t.settings(ev) for name, t in TASKS.items() if t.settings is not None}


def evaluate(
    model,
    tokenizer,
    config: EvalConfig,
    *,
    stage: str,
    device: str,
    compute_dtype,
    progress: bool,
    heldout_batches: Callable,
    cache: BaseEvalCache | None = None,
    coverages: dict | None = None,
    items: dict | None = None,
) -> tuple[dict, dict]:
    """Run `config.tasks` on `model` for `stage` ("before" or "after"); returns (results, seconds per task). With a
    cache (stage "before" only), cached results are reused and new ones stored. `coverages`, when given, receives
    {task: coverage entry} (coverage.py) for each task whose runner says its coverage, cached ones included; `items`
    likewise {task: per-item results} (items.py), for each task whose items give its recorded numbers."""
    ctx = EvalContext(tokenizer, stage, device, compute_dtype, progress, heldout_batches, config)
    results, seconds = {}, {}
    covs = {} if coverages is None else coverages
    kept = {} if items is None else items
    for name in config.tasks:
        task = TASKS[name]  # evaluation/checks.py rejected unknown names before any model was loaded
        if stage == "before" and not task.before:
            continue
        cached = cache.get(name, task.valid) if cache is not None else None
        if cached is not None:
            results[name] = cached
            if cache.coverage(name) is not None:
                covs[name] = cache.coverage(name)
            if cache.items(name) is not None:  # the cache checked that they give the cached result
                kept[name] = cache.items(name)
            log.info("%s %s: cached base result (%s)", stage, name, cache.path(name))
            continue
        t0 = time.perf_counter()
        ran = task.run(model, ctx)
        ran, task_items = (ran.out, ran.items) if isinstance(ran, WithItems) else (ran, None)
        out, cov = coverage.split(ran)
        seconds[name] = time.perf_counter() - t0
        results[name] = out
        if cov is not None:
            covs[name] = cov
        task_items = _agreeing(stage, name, task_items, out)
        if task_items is not None:
            kept[name] = task_items
        if cache is not None:
            cache.put(name, out, cov, task_items)
    return results, seconds


def _agreeing(stage: str, name: str, task_items: dict | None, result) -> dict | None:
    """`task_items` when they have the format's shape and give the numbers of `result`; other items are never kept
    (a warning): a resample of them would describe another result."""
    if not task_items:
        return None
    try:
        check_task(name, task_items)
        why = mismatch(task_items, result)
    except ItemsError as err:
        why = str(err)
    if why is None:
        return task_items
    log.warning("%s %s: per-item results dropped, they do not match the result (%s)", stage, name, why)
    return None


__all__ = [
    "AFTER_ONLY",
    "PROTOCOLS",
    "SUMMARIES",
    "TASKS",
    "BaseEvalCache",
    "WithItems",
    "EvalContext",
    "EvalTask",
    "cache_settings",
    "evaluate",
    "headline",
    "wikitext_source",
]
