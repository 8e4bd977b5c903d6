"""Eval mode: a completed run re-evaluated from its saved adapter, its results merged into its record.

qpeft-bench mode=eval run_dir=<run> eval=<option>
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from qpeft_bench import adapters, data, models, results
from qpeft_bench.config import ConfigError, adapter_target
from qpeft_bench.destinations import existing_run
from qpeft_bench.eval_stage import base_eval_cache, kept_items, run_eval, save_items
from qpeft_bench.quantized_base import load_base
from qpeft_bench.spec import validate
from qpeft_bench.summary import summary_line, summary_table
from qpeft_bench.train import prepare_for_training

log = logging.getLogger("qpeft_bench")


def trained_config(config: dict) -> tuple[Path, dict, dict]:
    """(run dir, its record, the config to re-evaluate with: the record's config with this command's eval section).
    Raises ConfigError when the run cannot be re-evaluated."""
    run_dir, record = existing_run(config.get("run_dir"))
    # A failed run with a saved adapter failed after training (the adapter is saved once training is done): its
    # evaluation, e.g. a benchmark file that went missing. Re-evaluating it finishes the run; the training is kept.
    if record.get("status") not in ("completed", "failed") or not record.get("adapter"):
        raise ConfigError(
            f"run_dir={str(run_dir)!r}: status {record.get('status')!r}"
            f"{'' if record.get('adapter') else ', no saved adapter'}; only a completed run with a "
            "saved adapter (train.save_adapter=true), or one whose evaluation failed after its adapter was saved, "
            "can be re-evaluated"
        )
    adapter = run_dir / record["adapter"]["path"]
    if not adapter.is_dir():
        raise ConfigError(f"{adapter} (the run's saved adapter) is missing")
    return run_dir, record, {**record["config"], "eval": config["eval"], "mode": "eval", "run_dir": str(run_dir)}


def reevaluate(config: dict, progress: bool, summary: bool) -> str:
    """`qpeft-bench mode=eval run_dir=<run> eval=<option>`: rebuild the quantized base, load the saved adapter (no
    training) and run the eval tasks; results are added to the record (same-named tasks replaced, everything else
    kept) with an entry in eval.reevaluations. Holds the run's lock, so that two re-evaluations (or a re-run of the
    training) never write the record at once and none loses the other's results."""
    try:
        run_dir = trained_config(config)[0]
    except ConfigError as err:  # not a re-evaluable run: one line, and nothing written there (not even a lock)
        log.error("config error: %s", err)
        return "failed"
    lock = results.RunLock(run_dir)
    holder = lock.acquire()
    if holder is not None:
        log.error(
            "run_dir=%s is in use by another process (pid %s), training or re-evaluating it; run this again "
            "when it has finished",
            run_dir,
            holder or "unknown",
        )
        return "failed"
    try:
        return _reevaluate(config, progress, summary)  # reads the record again, under the lock, then writes it
    finally:
        lock.release()


def _reevaluate(config: dict, progress: bool, summary: bool) -> str:
    try:
        run_dir, record, trained = trained_config(config)
        spec = validate(trained)
        data.check_source(spec.data.format, spec.data.path, spec.data.hub_id)
        device = models.resolve_device(spec.train.device)
    except Exception as err:
        log.error("config error: %s", err)
        return "failed"
    scratch = {"eval": {}}  # base loading writes data/quant/accounting: keep the trained run's own
    base = load_base(spec, device, scratch, lambda: None, progress)
    amod = adapters.get(spec.peft_method)
    targets = [t for t in base.targets if adapter_target(t, spec.peft_targets)]
    path = run_dir / record["adapter"]["path"]
    per_module = {"per_module": spec.peft_per_module} if spec.peft_per_module else {}
    # the run's per-item results: the tasks evaluated now replace theirs, the others are kept (read before the
    # record changes: its eval.items names the file as it is now)
    items = kept_items(run_dir / results.RECORD, record)
    evaluate = functools.partial(
        run_eval, spec, base.tokenizer, base.val_set, device, base.torch_dtype, progress, scratch, items=items
    )
    if spec.eval.before_finetune:
        cache = base_eval_cache(spec, base.compute_dtype, device) if spec.eval.cache_base else None
        evaluate(base.model, "before", cache)
    model = amod.load(base.model, targets, spec.peft, path, **per_module)
    # the norms as the trained run evaluated them (fp32 under train.upcast_norms_fp32): the same numbers again
    prepare_for_training(model, upcast_norms_fp32=spec.train.upcast_norms_fp32, gradient_checkpointing=False)
    evaluate(model, "after", None)
    ev = record.setdefault("eval", {})
    for key, value in scratch["eval"].items():
        if key in ("time_s", "coverage"):  # {stage: {task: ...}}: merge per stage
            for stage, times in value.items():
                ev.setdefault(key, {}).setdefault(stage, {}).update(times)
        elif isinstance(value, dict):  # before / after / protocols: new tasks added, re-run ones replaced
            ev.setdefault(key, {}).update(value)
        else:
            ev[key] = value
    entry = {"time": results.now(), "tasks": spec.eval.tasks, "device": device, "eval": config["eval"]}
    if record.get("status") == "failed":  # its evaluation failed after training: this one finished the run
        entry["finished_failed_run"] = record.pop("error", None)
        record["status"] = "completed"
    ev.setdefault("reevaluations", []).append(entry)
    ev.pop("items", None)  # points at the file as it was: save_items points it at the file as it is now
    save_items(run_dir, record, items)
    results.atomic_write_json(run_dir / results.RECORD, record)
    if summary:
        log.info("\n%s", summary_table(record, run_dir / results.RECORD))
    log.info("re-evaluated %s", summary_line(record, run_dir / results.RECORD))
    return "completed"
