"""The recipe: one run from top to bottom.

    validate -> (plan: meta model -> storage-format sizes -> adapters on meta -> record)          plan.py
    train:   data -> load -> quantize                                                            quantized_base.py
             -> evaluate base -> attach adapters -> fine-tune -> evaluate -> record              here, eval_stage.py
    eval:    a completed run's saved adapter on its rebuilt base, evaluated again                reevaluate.py

Library modules take plain arguments; only the recipe's modules know the shape of the config. The record is written
at each stage boundary (atomically), so a run killed at any point leaves a readable record saying how far it got.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import torch

from qpeft_bench import (
    accounting,
    adapters,
    calibration,
    checkpoint,
    data,
    distributed,
    fingerprint,
    layers,
    models,
    results,
    speedups,
    tracking,
)
from qpeft_bench.config import ConfigError, RunSpec
from qpeft_bench.eval_stage import base_eval_cache, run_eval, save_items
from qpeft_bench.model_identity import check_weights
from qpeft_bench.plan import plan_accounting, plan_estimate, with_adapters
from qpeft_bench.quantized_base import calibration_windows, load_base
from qpeft_bench.reevaluate import reevaluate
from qpeft_bench.spec import validate
from qpeft_bench.summary import summary_line, summary_table
from qpeft_bench.train import Diverged, make_optimizer, make_scheduler, prepare_for_training, train

log = logging.getLogger("qpeft_bench")
DONE = ("completed",)
KEEP = ("completed", "planned")  # records that another config must not replace in the same directory
ADAPTER_DIR = "adapter"  # inside the run directory
CHECKPOINT_DIR = "checkpoint"  # inside the run directory, while a run with train.checkpoint_every > 0 is going


def run(config: dict, run_dir: Path, progress: bool = True, summary: bool = True) -> str:
    """Run one configuration into `run_dir`; returns the final status (or 'skipped'). `summary`: log the
    run's summary table at the end (a planned grid prints one table for all runs instead)."""
    run_dir = Path(run_dir)
    rid = results.run_id(config)
    try:
        if config.get("mode") == "eval":  # the trained run's own config, with this command's eval section
            return reevaluate(config, progress, summary)
        spec = validate(config)
        device, world, prepared = None, distributed.SINGLE, None
        if spec.mode == "train":
            prepared = preflight(spec)
            device = models.resolve_device(spec.train.device)
            world, device = distributed.setup(spec.train.distributed, device, spec.train.gpus)
    except Exception as err:
        detail = str(err) if isinstance(err, (ConfigError, FileNotFoundError, ValueError)) else repr(err)
        # a ConfigError may list several problems (e.g. every missing benchmark file), each on its own line
        first = detail if isinstance(err, ConfigError) else (detail.splitlines()[0] if detail else "")
        log.error("config error: %s", first or type(err).__name__)
        return "failed"

    # One process per run: a second launch of the same run (two copies of a sweep, a re-submitted job array) skips
    # it while the first is alive. Process 0 of a torchrun job holds it for all of them.
    lock = results.RunLock(run_dir)
    holder = lock.acquire() if world.main else None
    if distributed.max_all(int(holder is not None), device, world):  # every process of the job follows process 0
        if world.main:
            log.info("skip: run %s is running in another process (pid %s)", rid, holder or "unknown")
        return "skipped"
    try:
        existing = results.read_record(run_dir)
        if existing is not None and not spec.overwrite:
            if existing.get("run_id") != rid and existing.get("status") in KEEP:
                log.error(
                    "%s holds the %s run %s of another config; choose another hydra.run.dir or set overwrite=true",
                    run_dir,
                    existing.get("status"),
                    existing.get("run_id"),
                )
                return "failed"
            if existing.get("run_id") == rid and existing.get("status") in DONE:
                log.info("skip: run %s already completed (%s); overwrite=true redoes it", rid, run_dir / results.RECORD)
                return "skipped"

        record = results.new_record(rid, config, "running", results.run_meta(device))
        record["input_fingerprints"] = fingerprint.inputs(config)  # what the files held (fingerprint.py)
        if spec.peft_per_module:  # the knobs each module really gets from peft.by_layer
            record["peft_layers"] = layers.knob_summary(
                spec.peft_per_module, adapters.get(spec.peft_method).PER_LAYER_KNOBS
            )
        path = run_dir / results.RECORD
        items: dict = {}  # {stage: {task: per-item results}}: the items file beside the record (eval_stage.py)

        def write_record():
            save_items(run_dir, record, items)
            results.atomic_write_json(path, record)

        # one writer: with several processes, process 0 keeps the record, the adapters and the evaluation
        write = write_record if world.main else (lambda: None)
        progress = progress and world.main
        try:
            if spec.mode == "plan":
                record["accounting"] = plan_accounting(spec)
                record["estimate"] = plan_estimate(spec, record["accounting"])
                record["status"] = "planned"
            else:
                write()
                fine_tune(
                    spec,
                    device,
                    record,
                    write,
                    progress,
                    adapter_dir=run_dir / ADAPTER_DIR,
                    world=world,
                    prepared=prepared,
                    items=items,
                )
                record["status"] = "completed"
        except Diverged as err:
            record["status"] = "diverged"
            record["train"].update({"diverged_at_step": err.step, "diverged_loss": err.loss})  # NaN -> "nan" on write
            log.error("%s", err)
        except torch.OutOfMemoryError as err:
            record["status"] = "oom"
            record["error"] = {
                "type": type(err).__name__,
                "message": (str(err).splitlines() or [""])[0],
                **results.memory_at_failure(device),
            }
            held = record["error"].get("memory_allocated_bytes", record["error"].get("rss_bytes"))
            log.error(
                "out of memory (%s GiB held): %s",
                "?" if held is None else f"{held / 2**30:.2f}",
                record["error"]["message"],
            )
        except Exception as err:
            record["status"] = "failed"
            record["error"] = {"type": type(err).__name__, "message": str(err)}
            log.exception("run %s failed", rid)
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (scancel, a SLURM time limit: cli.py raises it)
            # failed, not left "running": a sweep run again redoes it, and the report counts it as not trained
            how = err.args[0] if err.args else "SIGINT"
            record["status"] = "failed"
            record["error"] = {"type": "Interrupted", "message": f"stopped by {how} at {results.now()}"}
            log.error("run %s interrupted by %s; its record says failed", rid, how)
            raise
        finally:
            record["meta"]["end_time"] = results.now()
            write()
        if record["status"] == "oom" and device and device.startswith("cuda"):
            import gc  # the failed run's model is garbage now: give its memory back before the sweep's next run

            gc.collect()
            torch.cuda.empty_cache()
        if config.get("logger") == "wandb" and world.main and spec.mode != "plan":
            w = config.get("wandb") or {}
            record["wandb_dir"] = tracking.log_record(
                record,
                path,
                project=w.get("project", "qpeft-bench"),
                mode=w.get("mode", "offline"),
                directory=w.get("dir"),
            )
            write()
        if summary and world.main:
            log.info("\n%s", summary_table(record, path))
        if world.main:  # one line per finished run, also in sweeps: what a user greps a sweep's log for
            log.info("%s", summary_line(record, path))
        return record["status"]
    finally:
        lock.release()


def preflight(spec: RunSpec) -> tuple:
    """What a run reads besides the model, read before its first record and before any model is loaded, so a bad
    input is one line and no record: the data (read, typed, formatted, split and tokenized: data.prepare), the
    tokenizer (cheap, unlike the model), the weights' presence and the calibration text. Returns (tokenizer,
    prepared data) for load_base, which would otherwise prepare them again."""
    d = spec.data
    data.check_source(d.format, d.path, d.hub_id, d.template)
    if spec.calib.enabled and spec.calib.source == "text":
        calibration.check_text(spec.calib.path)
    tokenizer_source = spec.model.path or spec.model.hub_id
    tokenizer = models.load_tokenizer(tokenizer_source)
    data.check_tokenizer(tokenizer, tokenizer_source, spec.model.arch_dict().get("vocab_size"))
    check_weights(spec.model)
    prepared = data.prepare(d, tokenizer)
    calibration_windows(spec.calib, tokenizer, prepared.train_examples)  # enough tokens for calib.seq_len
    return tokenizer, prepared


def budgeted(spec: RunSpec, device: str) -> tuple[RunSpec, dict | None]:
    """train.memory_budget: the spec with checkpointing, upcast and loss chunking chosen to fit (speedups.choose, from
    plan mode's estimate, which models the plain path and so leaves the fused one some headroom), and the record of
    that choice; the spec as it is without a budget."""
    t = spec.train
    if t.memory_budget is None:
        return spec, None
    budget = speedups.budget_bytes(t.memory_budget, device)
    acc = plan_accounting(spec)

    def peak(settings: dict) -> int | None:
        trial = dataclasses.replace(spec, train=dataclasses.replace(t, **settings))
        return plan_estimate(trial, acc).get("peak_memory_bytes")

    settings, estimated = speedups.choose(budget, peak)
    # the chunked loss where it applies (not under FSDP, recipe.fine_tune); the estimate models the whole one anyway
    settings = {**settings, "chunked_loss": 0 if t.distributed == "fsdp" else t.chunked_loss or speedups.BUDGET_CHUNK}
    log.info(
        "train.memory_budget=%s (%.1f GiB): %s, estimated peak %.1f GiB",
        t.memory_budget,
        budget / speedups.GIB,
        settings,
        estimated / speedups.GIB,
    )
    choice = {"budget": t.memory_budget, "budget_bytes": budget, "estimated_peak_bytes": estimated, "chosen": settings}
    return dataclasses.replace(spec, train=dataclasses.replace(t, **settings)), choice


def fine_tune(
    spec: RunSpec,
    device: str,
    record: dict,
    save,
    progress: bool,
    adapter_dir: Path,
    world: distributed.World = distributed.SINGLE,
    prepared: tuple | None = None,
    items: dict | None = None,
) -> None:
    t_enter = time.perf_counter()
    spec, budget = budgeted(spec, device)
    d, t = spec.data, spec.train
    torch.manual_seed(spec.seed)
    # under FSDP only process 0 rebuilds the base after training: the others keep no CPU copy of it
    tokenizer, train_set, val_set, model, targets, compute_dtype, torch_dtype = load_base(
        spec, device, record, save, progress, keep=world.main or t.distributed != "fsdp", prepared=prepared
    )
    acc = record["accounting"]

    # 4. The quantized base before fine-tuning (the "no fine-tuning" row of the tables), cached across a sweep.
    evaluate = functools.partial(run_eval, spec, tokenizer, val_set, device, torch_dtype, progress, record, items=items)
    if spec.eval.before_finetune and world.main:
        cache = base_eval_cache(spec, compute_dtype, device) if spec.eval.cache_base else None
        evaluate(model, "before", cache)
        save()

    # 5. Adapters (seeded, so the same config starts from the same weights).
    t0 = time.perf_counter()
    with models.seeded(spec.seed):
        peft_model = with_adapters(acc, model, targets, adapters.get(spec.peft_method), spec)
    acc["adapter_init_time_s"] = time.perf_counter() - t0
    if getattr(peft_model, "qpeft_loftq", None) is not None:  # LoftQ: cache hit or miss, its own time
        record["adapter_init"] = {"loftq": peft_model.qpeft_loftq}
    save()
    prepare_for_training(
        peft_model, upcast_norms_fp32=t.upcast_norms_fp32, gradient_checkpointing=t.gradient_checkpointing
    )
    sharded = t.distributed == "fsdp"
    # the chunked loss reads lm_head's weight in backward, after FSDP has freed the gathered copy
    chunk = 0 if sharded else t.chunked_loss
    if chunk != t.chunked_loss:
        log.info(
            "train.chunked_loss=%d does not apply under train.distributed=fsdp: the loss is computed whole",
            t.chunked_loss,
        )
    switches = speedups.setup(
        peft_model,
        method=spec.peft_method,
        quant_name=spec.quant_name,
        device=device,
        fused_lora=t.fused_lora,
        compile=t.compile,
        sharded=sharded,
    )

    # 6. Fine-tune (data parallel or sharded under torchrun: distributed.py).
    trained = distributed.wrap(peft_model, world, device, t.distributed, models.DTYPE[spec.model.dtype])
    params = accounting.trainable_parameters(trained)  # FSDP's flat shards, not the modules' own tensors
    optimizer, opt_name = make_optimizer(params, t.optimizer, t.lr, t.weight_decay, device)
    scheduler = make_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, t.max_steps)
    record["train"] = {
        "optimizer": opt_name,
        "compute_dtype": compute_dtype,
        "device": device,
        "gradient_checkpointing": t.gradient_checkpointing,
        "upcast_norms_fp32": t.upcast_norms_fp32,
        "speed": {**switches, "chunked_loss": chunk, "memory_budget": budget},
    }
    if world.active:
        record["train"]["distributed"] = {
            "kind": t.distributed,
            "world_size": world.size,
            "global_batch": t.batch_size * t.grad_accum * world.size,
        }
    # Preemption: resume from this run's last checkpoint, if a killed attempt left one (checkpoint.py).
    ckpt = checkpoint.Checkpointer(
        adapter_dir.parent / CHECKPOINT_DIR, record["run_id"], t.checkpoint_every, write=world.main
    )
    state = ckpt.latest()
    start, done = 0, []
    if state is not None:
        checkpoint.restore(state, peft_model, optimizer, scheduler)
        start, done = state["step"], state["losses"]
        record["train"]["resumed_from_step"] = start
        log.info("resuming run %s from its checkpoint at step %d", record["run_id"], start)
    stream = _batch_stream(
        train_set,
        t.batch_size,
        tokenizer.pad_token_id,
        spec.seed,
        d.group_by_length,
        skip=start * t.grad_accum * world.size,
    )
    on_step = functools.partial(ckpt.maybe_save, model=peft_model, optimizer=optimizer, scheduler=scheduler)
    with speedups.loss_context(peft_model, chunk):
        record["train"].update(
            train(
                trained,
                stream,
                optimizer,
                scheduler,
                max_steps=t.max_steps,
                grad_accum=t.grad_accum,
                max_grad_norm=t.max_grad_norm,
                device=device,
                compute_dtype=torch_dtype,
                measure_after=t.measure_after,
                diverge_loss=t.diverge_loss,
                log_every=t.log_every,
                progress=progress,
                world=world,
                start_step=start,
                losses=done,
                on_step=on_step,
            )
        )
    save()

    speedups.teardown(peft_model)
    if sharded:  # process 0 takes the gathered adapters onto an unsharded base, to save and evaluate them
        state = distributed.trainable_state(trained, world)
        del trained, model, peft_model, optimizer, scheduler, on_step, params
        if device.startswith("cuda"):
            import gc  # FSDP's states refer to one another: only the cycle collector frees the shards

            gc.collect()
            torch.cuda.empty_cache()

    # 7. Keep the adapters (reloadable onto the same quantized base), then evaluate the fine-tuned model.
    if not world.main:
        distributed.barrier(world)  # process 0 saves and evaluates; the others wait for it to finish
        return
    try:  # the others wait at the barrier however this ends; a failure here still fails the run, after it
        if sharded:
            peft_model = unsharded(spec, device, state, progress, record["accounting"])
        if t.save_adapter:
            adapters.get(spec.peft_method).save(peft_model, adapter_dir, spec.peft)
            results.follow_umask(adapter_dir)  # peft and safetensors write 0600 files
            record["adapter"] = {"path": ADAPTER_DIR, "method": spec.peft_method, "name": spec.peft_name}
            save()
        evaluate(peft_model, "after", None)
        ckpt.clear()  # the run is complete: its adapters are saved, the checkpoints are no longer needed
        record["train"]["overhead_s"] = fixed_overhead(time.perf_counter() - t_enter, record)
    finally:
        distributed.barrier(world)


def unsharded(spec: RunSpec, device: str, state: dict[str, torch.Tensor], progress: bool, acc: dict):
    """The run's quantized base rebuilt whole on `device` (from this process' cache when train.reuse_base keeps
    one) with the adapters attached as in training and set to the trained values `state` (by name)."""
    base = load_base(spec, device, {"eval": {}}, lambda: None, progress)
    with models.seeded(spec.seed):
        model = with_adapters(dict(acc), base.model, base.targets, adapters.get(spec.peft_method), spec)
    prepare_for_training(model, upcast_norms_fp32=spec.train.upcast_norms_fp32, gradient_checkpointing=False)
    mine = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(mine) != set(state):
        missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        raise RuntimeError(
            f"gathered adapters do not match the rebuilt model: missing {missing[:3]}, extra {extra[:3]}"
        )
    with torch.no_grad():
        for name, param in mine.items():
            param.copy_(state[name])
    return model


def fixed_overhead(total_s: float, record: dict) -> float:
    """Seconds of a run that are neither training steps nor evaluation: loading, quantizing, attaching, compiling
    (the warm-up steps' time beyond that of a measured step), saving, evaluation set-up. A sweep pays it per run."""
    tr = record["train"]
    steps = tr["steps"] - tr.get("resumed_from_step", 0)
    evaluating = sum(sum(tasks.values()) for tasks in record["eval"].get("time_s", {}).values())
    return total_s - steps * tr["s_per_step"] - evaluating


def _batch_stream(features: list[dict], batch_size: int, pad_id: int, seed: int, group: bool, skip: int = 0):
    """Endless training batches: a new seeded order each epoch. `skip`: batches already consumed (a resumed run
    continues with exactly the batches it would have drawn next)."""
    lengths = [len(f["input_ids"]) for f in features]
    epoch = 0
    while True:
        order = data.make_batches(lengths, batch_size, seed=seed + epoch, group_by_length=group)
        for idx in order[skip:]:
            yield data.collate([features[i] for i in idx], pad_id)
        skip = max(0, skip - len(order))
        epoch += 1
