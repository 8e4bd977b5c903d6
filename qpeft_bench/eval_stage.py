"""Steps 4 and 7 of a run: the eval tasks on the base ("before") or the fine-tuned model ("after"), into the record,
and their per-item results into the items file beside it (evaluation/items.py).

The base's results are cached across a sweep on everything they depend on (`base_eval_cache`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from qpeft_bench import data, evaluation, fingerprint, results
from qpeft_bench.config import RunSpec
from qpeft_bench.evaluation.items import ItemsError, read_items, write_items

log = logging.getLogger("qpeft_bench")


def run_eval(
    spec: RunSpec,
    tokenizer,
    val_set: list[dict],
    device: str,
    torch_dtype,
    progress: bool,
    record: dict,
    model,
    stage: str,
    cache,
    items: dict | None = None,
) -> None:
    """Evaluate `model` on the run's eval tasks into record["eval"][stage] (adding to what is there), with each
    task's protocol and time. `items` ({stage: {task: per-item results}}), when given, receives the stage's items
    (`save_items` writes them beside the record)."""
    ev, coverages, stage_items = spec.eval, {}, {}
    out, seconds = evaluation.evaluate(
        model,
        tokenizer,
        ev,
        stage=stage,
        device=device,
        compute_dtype=torch_dtype,
        progress=progress,
        heldout_batches=lambda: _batches(
            val_set, ev.batch_size, tokenizer.pad_token_id, seed=0, group=False, limit=ev.max_batches
        ),
        cache=cache,
        coverages=coverages,
        items=stage_items,
    )
    record["eval"].setdefault(stage, {}).update(out)
    record["eval"].setdefault("coverage", {}).setdefault(stage, {}).update(coverages)  # evaluation/coverage.py
    record["eval"].setdefault("time_s", {}).setdefault(stage, {}).update(seconds)
    record["eval"].setdefault("protocols", {}).update({t: evaluation.PROTOCOLS[t] for t in out})
    if cache is not None:
        record["eval"]["before_cached"] = sorted(set(out) - set(seconds))
    if items is not None:
        stage_kept = items.setdefault(stage, {})
        for task in out:  # a task evaluated again without items must not keep the ones of its earlier result
            stage_kept.pop(task, None)
        stage_kept.update(stage_items)


def save_items(run_dir: Path, record: dict, items: dict) -> None:
    """Write `items` ({stage: {task: per-item results}}) to the items file of `run_dir` and point record["eval"]
    ["items"] at it (call before writing the record). Nothing to keep: nothing written, the record points at no
    file. A file that cannot be written (a full disk, a read-only directory) is a warning: the record is still
    written, without eval.items, never with a reference to a file that is not there."""
    stages = {stage: tasks for stage, tasks in items.items() if tasks}
    if not stages or "eval" not in record:
        return
    try:
        record["eval"]["items"] = write_items(run_dir, record["run_id"], stages)
    except (OSError, ItemsError) as err:
        log.warning("per-item results not written (%s); the record is written without them", err)
        record["eval"].pop("items", None)


def kept_items(record_path: Path, record: dict) -> dict:
    """The {stage: {task: per-item results}} of the items file the record points at ({} when none); a file that
    cannot be used is a warning and gives nothing (what is evaluated now is written anew)."""
    try:
        content = read_items(record_path, record)
    except ItemsError as err:
        log.warning("the run's per-item results cannot be read (%s); only the tasks evaluated now keep theirs", err)
        return {}
    return {} if content is None else content["stages"]


def base_eval_cache(spec: RunSpec, compute_dtype: str, device: str) -> evaluation.BaseEvalCache:
    """What the quantized base's results depend on: the model, the quantizer and its calibration, the data split
    (held-out set), the compute dtype, the device kind and this code (a content hash of the package)."""
    identity = {
        "model": dataclasses.asdict(spec.model),
        "quant": [spec.quant_name, dataclasses.asdict(spec.quant)],
        "calib": dataclasses.asdict(spec.calib),
        "data": dataclasses.asdict(spec.data),
        "compute_dtype": compute_dtype,
        "device": device.split(":")[0],
        "code": results.code_fingerprint(),
        "inputs": fingerprint.spec_inputs(spec),  # the files' contents, not only their paths
    }
    return evaluation.BaseEvalCache(identity, evaluation.cache_settings(spec.eval))


class _Batches:
    """The held-out batches, collated one at a time as they are read, with their number (the progress bar's total)
    and the number the split has without eval.max_batches (`available`: whether the cap cut it)."""

    def __init__(self, features: list[dict], order: list, pad_id: int, available: int):
        self.features, self.order, self.pad_id, self.available = features, order, pad_id, available

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        for idx in self.order:  # "index": the examples' indices in the split, the ids of their per-item results
            yield {**data.collate([self.features[i] for i in idx], self.pad_id), "index": torch.tensor(idx)}


def _batches(features: list[dict], batch_size: int, pad_id: int, seed: int, group: bool, limit: int | None = None):
    order = data.make_batches([len(f["input_ids"]) for f in features], batch_size, seed=seed, group_by_length=group)
    return _Batches(features, order[:limit], pad_id, len(order))
