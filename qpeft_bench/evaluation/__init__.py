"""Evaluation tasks (the `eval/` config group) on the in-memory model, and the cache of base-model results.

Tasks:
  ppl_heldout    exp(mean token NLL) over the labelled tokens of the fine-tuning data's validation split
  ppl_wikitext   windowed token perplexity of a WikiText-style test split (perplexity.py; the GPTQ/SmoothQuant/QEFT
                 protocol, not lm-eval's document-level word perplexity, so it carries its own label)
  mmlu, commonsense, leaderboard
                 lm-eval task sets on the in-memory model (harness.py)
  speed          generated tokens/s and forward/backward ms of one step (speed.py); after fine-tuning only

`evaluate` runs a list of them on one model and returns {task: result}; `ppl_heldout` stays a bare float (the
record's original key), every other task a dict. The quantized base's results ("before") do not depend on the
PEFT method, its seed or the training settings, so a sweep computes them once: `BaseEvalCache` keeps them on disk
per (model, quantizer, calibration, data split, compute dtype, device kind, task settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from qpeft_bench.results import atomic_write_json

log = logging.getLogger("qpeft_bench")

PROTOCOLS = {
    "ppl_heldout": "exp(mean token NLL) over the labelled tokens of the validation split of the fine-tuning data",
    "ppl_wikitext": "windowed token perplexity, non-overlapping windows, joined with blank lines",
    "mmlu": "lm-eval mmlu, 5-shot, test split, shots from dev, unweighted mean of the 57 subject accuracies",
    "commonsense": "lm-eval 0-shot hellaswag (acc_norm), piqa, winogrande, arc_easy, arc_challenge (acc_norm), "
    "boolq, openbookqa (acc); unweighted average",
    "leaderboard": "lm-eval Open LLM Leaderboard v1 shots; 6-task and 4-task (ARC-c, HellaSwag, MMLU, TruthfulQA) "
    "averages",
    "speed": "greedy tokens/s at batch 1 (median after a warm-up); forward and backward ms of one training step",
}
AFTER_ONLY = ("speed",)  # the speed of the model a run ships; the base's would measure no adapter path


def headline(result) -> float | None:
    """The one number of a task's result for summaries and tables: a perplexity, or the task set's average."""
    if result is None or isinstance(result, (int, float)):
        return result
    return result.get("ppl", result.get("average"))


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


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    *,
    stage: str,
    device: str,
    compute_dtype,
    progress: bool,
    heldout_batches: Callable,
    wikitext: dict,
    harness_cfg: dict,
    speed_cfg: dict,
    data_root: str | None,
    batch_size: int,
    cache: BaseEvalCache | None = None,
) -> tuple[dict, dict]:
    """Run `tasks` on `model` for `stage` ("before" or "after"); returns (results, seconds per task). With a
    cache (stage "before" only), cached results are reused and new ones stored."""
    from qpeft_bench.evaluation import harness, perplexity
    from qpeft_bench.evaluation import throughput as speed

    results, seconds = {}, {}
    for task in tasks:
        if stage == "before" and task in AFTER_ONLY:
            continue
        cached = cache.get(task) if cache is not None else None
        if cached is not None:
            results[task] = cached
            log.info("%s %s: cached base result (%s)", stage, task, cache.path(task))
            continue
        t0 = time.perf_counter()
        if task == "ppl_heldout":
            out = perplexity.heldout_perplexity(
                model, heldout_batches(), device, compute_dtype, progress, f"{stage}: ppl_heldout"
            )["ppl"]
        elif task == "ppl_wikitext":
            source = wikitext_source(
                wikitext["path"], data_root, wikitext["hub_id"], wikitext["variant"], wikitext["split"]
            )
            text = perplexity.wikitext_text(source, wikitext["hub_id"], wikitext["variant"], wikitext["split"])
            out = perplexity.windowed_perplexity(
                model,
                tokenizer,
                text,
                seq_len=wikitext["seq_len"],
                batch_size=batch_size,
                device=device,
                compute_dtype=compute_dtype,
                progress=progress,
                max_windows=wikitext["max_windows"],
            )
            out["source"] = source or f"{wikitext['hub_id']}/{wikitext['variant']}"
        elif task in harness.TASK_SETS:
            logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown the run's log
            out = harness.run_task_set(
                model,
                tokenizer,
                task,
                batch_size=harness_cfg["batch_size"],
                data_root=data_root,
                limit=harness_cfg["limit"],
                device=device,
                compute_dtype=compute_dtype,
                max_gen_toks=harness_cfg["max_gen_toks"],
                progress=progress,
            )
        elif task == "speed":
            out = {
                "generation": speed.generation_speed(
                    model,
                    tokenizer,
                    new_tokens=speed_cfg["new_tokens"],
                    repeats=speed_cfg["repeats"],
                    device=device,
                    compute_dtype=compute_dtype,
                ),
                "step": speed.step_speed(
                    model,
                    seq_len=speed_cfg["seq_len"],
                    batch_size=speed_cfg["batch_size"],
                    repeats=speed_cfg["repeats"],
                    device=device,
                    compute_dtype=compute_dtype,
                    gradient_checkpointing=speed_cfg["gradient_checkpointing"],
                ),
            }
        else:  # config.validate lists the tasks; a new one must be wired here
            raise NotImplementedError(f"eval task {task!r} has no implementation")
        seconds[task] = time.perf_counter() - t0
        results[task] = out
        if cache is not None:
            cache.put(task, out)
    return results, seconds


class BaseEvalCache:
    """Results of the quantized base per task, on disk under $QPEFT_CACHE/base_eval (default
    ~/.cache/qpeft-bench/base_eval). `identity` holds everything the base's results depend on except the task's
    own settings, which `settings` maps per task."""

    def __init__(self, identity: dict, settings: dict[str, dict], root: Path | None = None):
        base = os.environ.get("QPEFT_CACHE")
        self.root = root or (Path(base) if base else Path.home() / ".cache" / "qpeft-bench") / "base_eval"
        self.identity, self.settings = identity, settings

    def key(self, task: str) -> str:
        blob = json.dumps(
            {"identity": self.identity, "task": task, "settings": self.settings.get(task)}, sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def path(self, task: str) -> Path:
        return self.root / f"{task}-{self.key(task)}.json"

    def get(self, task: str):
        try:
            return json.loads(self.path(task).read_text())["result"]
        except (OSError, ValueError, KeyError):  # absent or unreadable: compute it again
            return None

    def put(self, task: str, result) -> None:
        atomic_write_json(
            self.path(task),
            {"task": task, "identity": self.identity, "settings": self.settings.get(task), "result": result},
        )
