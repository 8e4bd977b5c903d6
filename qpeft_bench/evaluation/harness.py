"""Benchmark task sets through lm-eval on the in-memory (quantized + adapted) model, offline from local files.

lm-eval is the engine: the model object we already hold is wrapped in lm-eval's HFLM, and every task is lm-eval's
own YAML config (prompts, few-shot sampling, metrics, filters). We never re-implement a task; for local data we
override only where the data comes from (dataset_path, dataset_name, dataset_kwargs), nothing else.

Task sets (`TASK_SETS`, a view of the sets registered in evaluation/__init__.py), the studies' protocols:
- `mmlu`: lm-eval's `mmlu` group (57 subject tasks, test split, 5 shots = the first 5 items of each subject's dev
  split), metric acc. lm-eval's own `mmlu` aggregate weighs each subject by its number of questions
  (`weight_by_size: True` in its group YAML, i.e. the mean over all 14,042 questions); the studies report the
  unweighted mean of the 57 subject accuracies, which is our `value`. lm-eval's number is kept beside it as
  `lm_eval_value`; both come from lm-eval's own aggregation function.
- `commonsense`: 0-shot hellaswag (acc_norm), piqa (acc), winogrande (acc), arc_easy (acc), arc_challenge
  (acc_norm), boolq (acc), openbookqa (acc); each and their unweighted average. evaluations.md names acc_norm for
  hellaswag and arc_challenge only, so every other task reports acc (openbookqa included).
- `leaderboard` (Open LLM Leaderboard v1 settings): MMLU 5-shot acc, HellaSwag 10-shot acc_norm, ARC-c 25-shot
  acc_norm, TruthfulQA mc2 0-shot, WinoGrande 5-shot acc, GSM8k 5-shot exact match (the "strict-match" filter,
  `#### <number>`, the only extraction the v1 leaderboard had); `average` over the six and `average_4` over ARC-c,
  HellaSwag, MMLU and TruthfulQA.
Few-shot examples are sampled the way lm-eval's CLI samples them (simple_evaluate's default seeds). simple_evaluate
also seeds Python's, NumPy's and torch's global generators; they are put back as they were afterwards, so that what
runs next (training after the base's evaluation) does not depend on whether that evaluation ran or came from the cache.

Local data (`data_root`, else the environment variable QPEFT_EVAL_DATA; neither: the hub ids, unchanged). The
layout mirrors the hub ids of lm-eval's task YAMLs:

    <data_root>/<dataset_path>/<dataset_name or "default">/<split>.jsonl

e.g. `cais/mmlu/abstract_algebra/dev.jsonl`, `Rowan/hellaswag/default/validation.jsonl`,
`allenai/ai2_arc/ARC-Challenge/train.jsonl`: JSON lines with the columns of the hub dataset. Only the splits a
task reads must be there (`read_splits`: the evaluated split, plus the few-shot source when it has shots); their
first rows are checked through the task's own templates before any model loads (evaluation/local_data.py). The
files are read by datasets' packaged `json` builder, which never contacts the hub.
qpeft_bench/assets/eval_fixtures (written by scripts/make_eval_fixtures.py) is such a root, a few items per task.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from importlib.metadata import version
from pathlib import Path

from qpeft_bench.config import ConfigError
from qpeft_bench.evaluation.items import score_items
from qpeft_bench.evaluation.tasks import TaskSpec, lm_eval_sets

ENV_DATA = "QPEFT_EVAL_DATA"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
SEED_KEYS = ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")  # simple_evaluate's, in its results
FIXTURES = Path(__file__).resolve().parent.parent / "assets" / "eval_fixtures"


# The task sets are defined in the registry (evaluation/__init__.py registers them in tasks.TASKS, before Python
# loads this module); these are its views in the shapes this module, the tests and scripts/make_eval_fixtures.py read.
TASK_SETS: dict[str, dict] = {name: {"tasks": s.tasks, "averages": s.averages} for name, s in lm_eval_sets().items()}
# Where each task's YAML lives under lm_eval/tasks. Indexing only these folders takes ~0.05 s; lm-eval's default
# TaskManager indexes all ~15,000 tasks, ~10 s, on every run.
TASK_DIRS = {task: folder for s in lm_eval_sets().values() for task, folder in s.dirs.items()}


def task_specs(task_set: str) -> tuple[TaskSpec, ...]:
    if task_set not in TASK_SETS:
        raise ConfigError(f"unknown eval task set '{task_set}'; choose one of {sorted(TASK_SETS)}")
    return TASK_SETS[task_set]["tasks"]


@functools.lru_cache(maxsize=8)
def task_manager(dirs: tuple[str, ...]):
    """lm-eval's TaskManager over these folders of lm_eval/tasks only."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.__file__).parent / "tasks"
    return TaskManager(include_defaults=False, include_path=[str(root / d) for d in dirs])


def set_task_manager(task_set: str):
    """The TaskManager that knows every task of this set."""
    return task_manager(tuple(sorted({TASK_DIRS[s.task] for s in task_specs(task_set)})))


def leaf_tasks(tm, name: str) -> list[str]:
    """The lm-eval tasks that a task, tag or group name stands for, in lm-eval's order (groups recurse)."""
    from lm_eval.tasks._index import Kind

    entry = tm.task_index.get(name)
    if entry is None:
        raise ConfigError(f"lm-eval {version('lm_eval')} has no task, group or tag '{name}'")
    if entry.kind == Kind.TAG:
        return sorted(entry.tags)
    if entry.kind == Kind.GROUP:
        members = entry.cfg["task"]
        return [t for m in (members if isinstance(members, list) else [members]) for t in leaf_tasks(tm, m)]
    return [name]


def task_config(tm, task: str) -> dict:
    """lm-eval's config of one task as its YAML gives it (includes merged, !function references unresolved)."""
    return tm.task_index[task].cfg


def read_splits(config: dict, num_fewshot: int) -> dict[str, str]:
    """{split key: split} of the splits lm-eval reads for this task config at `num_fewshot` shots.

    lm-eval 0.4 evaluates the test split if the config names one, else the validation split; and when it builds a
    task it opens the few-shot source even at 0 shots: the fewshot split, else train, else validation, else test
    (ConfigurableTask.fewshot_docs). At 0 shots nothing is drawn from that source, so `lm_eval_tasks` points it at
    the evaluated split instead and the other splits need not exist."""
    evaluated = "test_split" if config.get("test_split") else "validation_split"
    splits = {evaluated: config[evaluated]} if config.get(evaluated) else {}
    if num_fewshot > 0:
        source = next((k for k in ("fewshot_split", "training_split", "validation_split") if config.get(k)), None)
        if source is not None:
            splits[source] = config[source]
    return splits


def local_files(config: dict, root: Path, num_fewshot: int | None = None) -> dict[str, Path]:
    """{split: file} under a local data root (the layout above): the splits a task reads at `num_fewshot` shots,
    or (None) every split its config names, as the converters and the fixtures write them."""
    folder = Path(root) / config["dataset_path"] / (config.get("dataset_name") or "default")
    named = {config[k] for k in SPLIT_KEYS if config.get(k)}
    splits = named if num_fewshot is None else set(read_splits(config, num_fewshot).values())
    return {s: folder / f"{s}.jsonl" for s in sorted(splits)}


def resolve_data_root(data_root: str | os.PathLike | None) -> Path | None:
    """The local data root: the argument, else $QPEFT_EVAL_DATA, else None (the hub)."""
    root = data_root if data_root is not None else os.environ.get(ENV_DATA) or None
    return None if root is None else Path(root).expanduser()


def check_local_data(task_set: str, data_root: str | os.PathLike | None) -> Path | None:
    """Returns the resolved local root (None: the hub) after checking that every file the set reads is there, so a
    run can fail at validation, before training, naming each missing file and what to set."""
    root = resolve_data_root(data_root)
    if root is None:
        return None
    tm = set_task_manager(task_set)
    missing = [
        (task, split, path)
        for spec in task_specs(task_set)
        for task in leaf_tasks(tm, spec.task)
        for split, path in local_files(task_config(tm, task), root, spec.num_fewshot).items()
        if not path.is_file()
    ]
    if missing:
        source = "data_root" if data_root is not None else f"${ENV_DATA}"
        shown = "\n".join(f"  {p}  (lm-eval task {t}, split {s})" for t, s, p in missing[:8])
        more = f"\n  ... and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ConfigError(
            f"eval task set '{task_set}' reads local data from {root} (set by {source}), but {len(missing)} "
            f"file(s) are missing:\n{shown}{more}\nPut each split there as JSON lines in the hub dataset's schema "
            f"(<data_root>/<dataset_path>/<dataset_name or 'default'>/<split>.jsonl), point the eval config's "
            f"data_root or ${ENV_DATA} at a folder that has them, or leave both unset to read the hub."
        )
    return root


def lm_eval_tasks(task_set: str, root: Path | None) -> list[dict]:
    """The task set as one lm-eval inline group whose members name registered tasks (a group entry such as mmlu
    contributes its leaf tasks) plus our overrides: n-shot, and the data source when `root` is set. lm-eval merges
    each member over that task's own YAML. The group has no aggregate or metadata of its own because lm-eval 0.4.13
    copies a top-level inline group's keys into every member; summarize() aggregates instead."""
    tm = set_task_manager(task_set)

    def member(task: str, shots: int) -> dict:
        over = {"task": task, "num_fewshot": shots}
        if root is not None:
            config = task_config(tm, task)
            files = local_files(config, root, shots)
            # splits it does not read are unset, so that lm-eval opens none of them (read_splits)
            unread = {k: None for k in SPLIT_KEYS if config.get(k) and k not in read_splits(config, shots)}
            over.update(
                dataset_path="json",
                dataset_name=None,
                dataset_kwargs={"data_files": {s: str(p) for s, p in files.items()}},
                **unread,
            )
        return over

    members = [member(t, spec.num_fewshot) for spec in task_specs(task_set) for t in leaf_tasks(tm, spec.task)]
    return [{"group": f"qpeft_{task_set}", "task": members}]


def run_task_set(
    model,
    tokenizer,
    task_set: str,
    *,
    batch_size: int | str,
    data_root=None,
    limit: int | None = None,
    device: str,
    compute_dtype=None,
    max_gen_toks: int | None = None,
    progress: bool = True,
    items: dict | None = None,
) -> dict:
    """Evaluate the in-memory `model` (a transformers model, or a peft wrapper around one) on a task set.

    batch_size: lm-eval's (an int, or "auto"); data_root: local data (see the module doc; None: $QPEFT_EVAL_DATA,
    else the hub); limit: at most this many items per lm-eval task (tests and smoke runs: the numbers are then not
    the benchmark's); device: where the model already is (HFLM runs a model object on its own device and never
    moves it); compute_dtype: autocast dtype of the forward passes (None or float32: none), as in training;
    max_gen_toks: cap on generated tokens of generation tasks (gsm8k; lm-eval's default 256), recorded when set.
    Returns the record of `summarize` plus the engine, lm-eval's version, our settings, the data source, lm-eval's
    seeds (they pick the few-shot examples) and the wall time; JSON-serialisable. Contexts cut to the model's length
    are counted per task (truncation.py) and logged once per task, not once per request. `items`, when given,
    receives the set's per-document scores (`per_item`; lm-eval then keeps its samples, which costs memory only).
    """
    import torch
    from lm_eval.evaluator import simple_evaluate

    from qpeft_bench.evaluation.truncation import CountingHFLM, collapsed_warnings, log_counts

    root = check_local_data(task_set, data_root)
    want, have = torch.device(device), model.device
    if want.type != have.type or (want.index is not None and want.index != have.index):
        raise ConfigError(f"eval device is '{device}' but the model is on {have}; move the model first")
    tasks = lm_eval_tasks(task_set, root)
    gen_kwargs = None if max_gen_toks is None else {"max_gen_toks": int(max_gen_toks)}
    mixed = None if compute_dtype in (None, torch.float32, "float32") else compute_dtype

    was_training = model.training  # HFLM puts the model in eval mode; hand it back as it came
    t0 = time.perf_counter()
    try:
        with _quiet(progress), _no_hub_telemetry(root is not None), collapsed_warnings(), _global_rngs_kept():
            lm = CountingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, mixed_precision_dtype=mixed)
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=set_task_manager(task_set),
                limit=limit,
                gen_kwargs=gen_kwargs,
                log_samples=items is not None,
            )
    finally:
        model.train(was_training)
    wall = time.perf_counter() - t0

    record = summarize(out, task_set, lm.counts())
    log_counts({t: (e["truncated"], e["samples"]) for t, e in record["tasks"].items()}, lm.max_length)
    record.update(
        engine="lm-eval",
        lm_eval_version=version("lm_eval"),
        batch_size=batch_size,
        limit=limit,
        device=str(have),
        compute_dtype=None if mixed is None else str(mixed).replace("torch.", ""),
        data={"source": "hub"} if root is None else {"source": "local", "root": str(root)},
        seeds={k: out["config"].get(k) for k in SEED_KEYS},
        wall_time_s=wall,
    )
    if gen_kwargs is not None:
        record["generation_overrides"] = gen_kwargs
    if items is not None:
        items.update(per_item(out, task_set))
    return record


def per_item(out: dict, task_set: str) -> dict:
    """The set's items (evaluation/items.py) from lm-eval's logged samples (`out["samples"]`: per leaf task, one
    sample per document and filter, holding each metric's value): per leaf, the documents' scores of its entry's
    metric under its filter, in lm-eval's order (the order of the values its `mean` aggregated)."""
    tm = set_task_manager(task_set)
    entries = {spec.task: leaf_tasks(tm, spec.task) for spec in task_specs(task_set)}
    leaves = {}
    for spec in task_specs(task_set):
        for leaf in entries[spec.task]:
            docs = [s for s in out["samples"][leaf] if s["filter"] == spec.filter]
            leaves[leaf] = {"doc_ids": [s["doc_id"] for s in docs], "scores": [s[spec.metric] for s in docs]}
    return score_items(leaves, entries, TASK_SETS[task_set]["averages"])


def summarize(out: dict, task_set: str, truncated: dict[str, int] | None = None) -> dict:
    """lm-eval's results dict -> {"task_set", "tasks": {entry: {...}}, and the set's averages}.

    Each entry has version, num_fewshot, split (the one evaluated), fewshot_split, metric, filter, value, stderr,
    samples (items evaluated), samples_total (the task's items; more than samples under a limit) and, with
    `truncated` ({lm-eval task: items whose context was cut}), truncated. A group entry (mmlu) also holds its `subtasks`; its `value` is the unweighted
    mean of theirs (the studies' number), with the matching stderr, and `lm_eval_value` is the aggregate that
    lm-eval's registered group declares (mmlu: weighted by items); both from lm-eval's own aggregation functions.
    The averages are unweighted means over the entries' values."""
    from lm_eval.api.metrics import aggregate_subtask_metrics, unweighted_mean_stderr
    from lm_eval.tasks._index import Kind

    tm = set_task_manager(task_set)
    tasks = {}
    for spec in task_specs(task_set):
        entry = tm.task_index[spec.task]
        if entry.kind != Kind.GROUP:
            tasks[spec.task] = _task_entry(out, spec.task, spec, truncated)
            continue
        subs = {t: _task_entry(out, t, spec, truncated) for t in leaf_tasks(tm, spec.task)}
        values, sizes = [s["value"] for s in subs.values()], [s["samples"] for s in subs.values()]
        stderrs = [s["stderr"] for s in subs.values()]
        weighted = [
            a.get("weight_by_size", True)
            for a in entry.cfg.get("aggregate_metric_list") or []
            if a["metric"] == spec.metric
        ]
        first = next(iter(subs.values()))
        tasks[spec.task] = {
            "version": entry.cfg.get("metadata", {}).get("version"),
            "num_fewshot": first["num_fewshot"],
            "split": first["split"],
            "fewshot_split": first.get("fewshot_split"),
            "metric": spec.metric,
            "filter": spec.filter,
            "value": _num(aggregate_subtask_metrics(values, sizes, weight_by_size=False)),
            "stderr": None if None in stderrs else _num(unweighted_mean_stderr(stderrs)),
            "aggregation": f"unweighted mean of {len(subs)} subtasks",
            "lm_eval_value": _num(aggregate_subtask_metrics(values, sizes, weight_by_size=weighted[0]))
            if weighted
            else None,
            "lm_eval_aggregation": ("mean weighted by items" if weighted[0] else "unweighted mean")
            if weighted
            else None,
            "samples": sum(sizes),
            "samples_total": sum(s["samples_total"] for s in subs.values()),
            **({} if truncated is None else {"truncated": sum(s["truncated"] for s in subs.values())}),
            "subtasks": subs,
        }
    record = {"task_set": task_set, "tasks": tasks}
    for name, members in TASK_SETS[task_set]["averages"].items():
        values = [tasks[m]["value"] for m in members]
        record[name] = None if None in values else sum(values) / len(values)
    return record


def _task_entry(out: dict, task: str, spec: TaskSpec, truncated: dict[str, int] | None = None) -> dict:
    cfg, result, key = out["configs"][task], out["results"][task], f"{spec.metric},{spec.filter}"
    if key not in result:
        raise KeyError(f"lm-eval reported no '{key}' for {task}; it has {sorted(result)}")
    entry = {
        "version": out["versions"][task],
        "num_fewshot": out["n-shot"][task],
        "split": cfg.get("test_split") or cfg.get("validation_split"),  # lm-eval evaluates test if it has one
        "metric": spec.metric,
        "filter": spec.filter,
        "value": _num(result[key]),
        "stderr": _num(result.get(f"{spec.metric}_stderr,{spec.filter}")),
        "samples": int(out["n-samples"][task]["effective"]),
        "samples_total": int(out["n-samples"][task]["original"]),
    }
    if truncated is not None:
        entry["truncated"] = int(truncated.get(task, 0))
    if entry["num_fewshot"]:  # lm-eval's rule: the fewshot split, else train, else validation
        entry["fewshot_split"] = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
    if cfg.get("output_type") == "generate_until":
        entry["generation_kwargs"] = cfg.get("generation_kwargs")
    return entry


def _num(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no stderr
        return None
    return x if math.isfinite(x) else None


@contextlib.contextmanager
def _global_rngs_kept():
    """Python's, NumPy's and torch's global generators as they were before lm-eval seeded them: otherwise a run whose
    base results came from the cache would train (dropout) from another random state than one that computed them,
    and the same run repeated would give other numbers."""
    import random

    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


@contextlib.contextmanager
def _no_hub_telemetry(local: bool):
    """With local data nothing may reach for the network. The one thing that still does, when HF_DATASETS_OFFLINE
    is not set, is datasets' download counter: each load_dataset("json", ...) sends a HEAD request to the hub (3 s
    timeout, errors swallowed), 57 of them for MMLU. datasets reads the switch at each call: off meanwhile."""
    import datasets.config

    saved = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = saved and not local
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = saved


@contextlib.contextmanager
def _quiet(progress: bool):
    """Without progress: no progress bars, and only lm-eval's errors in the log. lm-eval 0.4.13 has no switch for
    its bars (evaluate() never passes disable_tqdm, and tqdm reads TQDM_DISABLE only at import), so the `tqdm` name
    of the three lm-eval modules that draw them on this path is swapped for a disabled one meanwhile (display
    only)."""
    if progress:
        yield
        return
    import datasets
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface
    from tqdm.auto import tqdm

    def silent(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    modules = (lm_eval.api.model, lm_eval.api.task, lm_eval.models.huggingface)
    saved = [m.tqdm for m in modules]
    logger = logging.getLogger("lm_eval")
    old_level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    for m in modules:
        m.tqdm = silent
    try:
        yield
    finally:
        for m, t in zip(modules, saved, strict=True):
            m.tqdm = t
        logger.setLevel(old_level)
        if bars:
            datasets.enable_progress_bars()
