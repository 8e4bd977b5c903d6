"""Steps 4 and 7 of a run: the eval tasks on the base ("before") or the fine-tuned model ("after"), into the record.

The base's results are cached across a sweep on everything they depend on (`base_eval_cache`).
"""

from __future__ import annotations

import dataclasses

from qpeft_bench import data, evaluation, fingerprint, results
from qpeft_bench.config import RunSpec


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
) -> None:
    """Evaluate `model` on the run's eval tasks into record["eval"][stage] (adding to what is there), with each
    task's protocol and time."""
    ev, coverages = spec.eval, {}
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
    )
    record["eval"].setdefault(stage, {}).update(out)
    record["eval"].setdefault("coverage", {}).setdefault(stage, {}).update(coverages)  # evaluation/coverage.py
    record["eval"].setdefault("time_s", {}).setdefault(stage, {}).update(seconds)
    record["eval"].setdefault("protocols", {}).update({t: evaluation.PROTOCOLS[t] for t in out})
    if cache is not None:
        record["eval"]["before_cached"] = sorted(set(out) - set(seconds))


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
        for idx in self.order:
            yield data.collate([self.features[i] for i in idx], self.pad_id)


def _batches(features: list[dict], batch_size: int, pad_id: int, seed: int, group: bool, limit: int | None = None):
    order = data.make_batches([len(f["input_ids"]) for f in features], batch_size, seed=seed, group_by_length=group)
    return _Batches(features, order[:limit], pad_id, len(order))
