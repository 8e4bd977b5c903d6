"""The recipe: one run from top to bottom.

    validate -> (plan: meta model -> storage-format sizes -> adapters on meta -> record)
    train:   data -> load -> quantize -> evaluate base -> attach adapters -> fine-tune -> evaluate -> record

Library modules take plain arguments; only this file knows the shape of the config. The record is written
at each stage boundary (atomically), so a run killed at any point leaves a readable record saying how far it got.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import time
import typing
from datetime import datetime
from pathlib import Path

import torch

from qpeft_bench import (
    accounting,
    adapters,
    calibration,
    checkpoint,
    data,
    distributed,
    estimate,
    evaluation,
    layers,
    models,
    quant,
    results,
    speed,
    tracking,
)
from qpeft_bench.config import ConfigError, RunSpec, adapter_target
from qpeft_bench.spec import validate
from qpeft_bench.train import Diverged, make_optimizer, make_scheduler, prepare_for_training, train

log = logging.getLogger("qpeft_bench")
DONE = ("completed",)
KEEP = ("completed", "planned")
ADAPTER_DIR = "adapter"  # inside the run directory
CHECKPOINT_DIR = "checkpoint"  # inside the run directory, while a run with train.checkpoint_every > 0 is going  # records that another config must not replace in the same directory


def run(config: dict, run_dir: Path, progress: bool = True, summary: bool = True) -> str:
    """Run one configuration into `run_dir`; returns the final status (or 'skipped'). `summary`: log the
    run's summary table at the end (a planned grid prints one table for all runs instead)."""
    run_dir = Path(run_dir)
    rid = results.run_id(config)
    try:
        if config.get("mode") == "eval":  # the trained run's own config, with this command's eval section
            return reevaluate(config, progress, summary)
        spec = validate(config)
        device, world = None, distributed.SINGLE
        if spec.mode == "train":
            if spec.train.distributed == "fsdp" and not spec.model.path:
                raise ConfigError(
                    "train.distributed=fsdp loads the base layer by layer from a local safetensors "
                    "checkpoint: set model.path to its directory"
                )
            data.check_source(spec.data.format, spec.data.path, spec.data.hub_id)
            tokenizer_source = spec.model.path or spec.model.hub_id  # a tokenizer is cheap; the model is not
            data.check_tokenizer(models.load_tokenizer(tokenizer_source), tokenizer_source)
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
        if spec.peft_per_module:  # the knobs each module really gets from peft.by_layer
            record["peft_layers"] = layers.knob_summary(
                spec.peft_per_module, adapters.get(spec.peft_method).PER_LAYER_KNOBS
            )
        path = run_dir / results.RECORD
        # one writer: with several processes, process 0 keeps the record, the adapters and the evaluation
        write = (lambda: results.atomic_write_json(path, record)) if world.main else (lambda: None)
        progress = progress and world.main
        try:
            if spec.mode == "plan":
                record["accounting"] = plan_accounting(spec)
                record["estimate"] = plan_estimate(spec, record["accounting"])
                record["status"] = "planned"
            else:
                write()
                fine_tune(spec, device, record, write, progress, adapter_dir=run_dir / ADAPTER_DIR, world=world)
                record["status"] = "completed"
        except Diverged as err:
            record["status"] = "diverged"
            record["train"].update({"diverged_at_step": err.step, "diverged_loss": err.loss})  # NaN -> "nan" on write
            log.error("%s", err)
        except torch.OutOfMemoryError as err:
            record["status"] = "oom"
            record["error"] = {
                "type": type(err).__name__,
                "message": str(err).splitlines()[0],
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


# ----------------------------------------------------------------------------------------------------------------
# Eval mode: a completed run re-evaluated from its saved adapter
# ----------------------------------------------------------------------------------------------------------------


def trained_config(config: dict) -> tuple[Path, dict, dict]:
    """(run dir, its record, the config to re-evaluate with: the record's config with this command's eval section).
    Raises ConfigError when the run cannot be re-evaluated."""
    if not config.get("run_dir"):
        raise ConfigError("mode=eval needs run_dir=<a completed run's directory>")
    run_dir = Path(config["run_dir"])
    record = results.read_record(run_dir)
    if record is None:
        raise ConfigError(f"run_dir={str(run_dir)!r} holds no readable {results.RECORD}")
    if record.get("status") != "completed" or not record.get("adapter"):
        raise ConfigError(
            f"run_dir={str(run_dir)!r}: status {record.get('status')!r}"
            f"{'' if record.get('adapter') else ', no saved adapter'}; only a completed run with a "
            "saved adapter (train.save_adapter=true) can be re-evaluated"
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
    if spec.eval.before_finetune:
        cache = base_eval_cache(spec, base.compute_dtype, device) if spec.eval.cache_base else None
        run_eval(
            spec, base.tokenizer, base.val_set, device, base.torch_dtype, progress, scratch, base.model, "before", cache
        )
    model = amod.load(base.model, targets, spec.peft, path, **per_module)
    # the norms as the trained run evaluated them (fp32 under train.upcast_norms_fp32): the same numbers again
    prepare_for_training(model, upcast_norms_fp32=spec.train.upcast_norms_fp32, gradient_checkpointing=False)
    run_eval(spec, base.tokenizer, base.val_set, device, base.torch_dtype, progress, scratch, model, "after", None)
    ev = record.setdefault("eval", {})
    for key, value in scratch["eval"].items():
        if key == "time_s":  # {stage: {task: s}}: merge per stage
            for stage, times in value.items():
                ev.setdefault("time_s", {}).setdefault(stage, {}).update(times)
        elif isinstance(value, dict):  # before / after / protocols: new tasks added, re-run ones replaced
            ev.setdefault(key, {}).update(value)
        else:
            ev[key] = value
    ev.setdefault("reevaluations", []).append(
        {"time": results.now(), "tasks": spec.eval.tasks, "device": device, "eval": config["eval"]}
    )
    results.atomic_write_json(run_dir / results.RECORD, record)
    if summary:
        log.info("\n%s", summary_table(record, run_dir / results.RECORD))
    log.info("re-evaluated %s", summary_line(record, run_dir / results.RECORD))
    return "completed"


# ----------------------------------------------------------------------------------------------------------------
# Plan mode: accounting from the architecture card alone
# ----------------------------------------------------------------------------------------------------------------


def plan_accounting(spec: RunSpec) -> dict:
    """Storage accounting of the run from its architecture card (cached per process on everything it depends on,
    so the seeds and training settings of a sweep's grid cost one meta-model build between them)."""
    key = json.dumps(
        [
            spec.model.arch_dict(),
            spec.model.dtype,
            spec.model.linear_names,
            spec.quant_name,
            dataclasses.asdict(spec.quant),
            spec.peft_method,
            dataclasses.asdict(spec.peft),
            spec.peft_targets,
            {n: dataclasses.asdict(c) for n, c in spec.peft_per_module.items()},
        ],
        sort_keys=True,
        default=str,
    )
    if key not in _PLANNED:
        _PLANNED[key] = _plan_accounting(spec)
    return dict(_PLANNED[key])


_PLANNED: dict[str, dict] = {}


def _plan_accounting(spec: RunSpec) -> dict:
    qmod, amod = quant.get(spec.quant_name), adapters.get(spec.peft_method)
    model = models.build_meta_model(spec.model.arch_dict(), spec.model.dtype)
    targets = list(models.find_linears(model, spec.model.linear_names))
    acc = accounting.base_sizes(model)
    storage = functools.partial(qmod.linear_storage, cfg=spec.quant, dtype=spec.model.dtype)
    acc.update(accounting.planned_quantized_sizes(model, targets, storage))
    with torch.device("meta"):  # adapters born on meta: no random init of 7B-70B-sized factors (seconds per run)
        with_adapters(acc, model, targets, amod, spec)
    return acc


def plan_estimate(spec: RunSpec, acc: dict) -> dict:
    """Peak GPU memory and training time on one H100-class GPU, estimated from the architecture and the accounting
    (qpeft_bench/estimate.py says what is and is not modelled). Padded batches of the longest sequence: an upper
    bound on memory and time per step."""
    t, d = spec.train, spec.data
    arch, seq = spec.model.arch_dict(), d.max_source_len + d.max_target_len
    compute = spec.model.dtype if t.compute_dtype == "auto" else t.compute_dtype
    try:
        mem = estimate.train_memory(
            arch,
            batch_size=t.batch_size,
            seq_len=seq,
            gradient_checkpointing=t.gradient_checkpointing,
            upcast_norms_fp32=t.upcast_norms_fp32,
            compute_dtype=compute,
            model_dtype=spec.model.dtype,
            adapter_dtype=getattr(spec.peft, "adapter_dtype", "float32"),
            trainable_params=acc["trainable_params"],
            quantized_bytes=acc["quantized_model_bytes"],
            adapter_rank=getattr(spec.peft, "r", 0),
            adapter_dropout=getattr(spec.peft, "dropout", 0.0),
            adapter_targets=spec.peft_targets,
            optimizer=t.optimizer,
            dequantizes=spec.quant_name != "none",
            output_follows_input_dtype=getattr(quant.get(spec.quant_name), "OUTPUT_FOLLOWS_INPUT_DTYPE", False),
        )
        mem = estimate.per_gpu(mem, t.distributed, t.gpus, arch.get("num_hidden_layers", 1))
        flops = estimate.step_flops(
            arch,
            batch_size=t.batch_size,
            seq_len=seq,
            grad_accum=t.grad_accum,
            gradient_checkpointing=t.gradient_checkpointing,
            trainable_params=acc["trainable_params"],
        )
    except ConfigError as err:  # an architecture family the estimator does not model: accounting still stands
        return {"unavailable": str(err)}
    step_s = estimate.step_seconds(flops)
    return {
        "peak_memory_bytes": mem["peak_bytes"],
        "allocated_peak_bytes": mem["allocated_peak_bytes"],
        "step_flops": flops,
        "s_per_step": step_s,
        "run_seconds": estimate.run_seconds(t.max_steps, step_s),
        "seq_len": seq,
        "gpus": t.gpus,
        "distributed": t.distributed,
        "basis": "per H100-class GPU, reference-stack efficiency (qpeft_bench/estimate.py)",
    }


def with_adapters(acc: dict, model, targets: list[str], amod, spec: RunSpec):
    """Attach the adapters and add their accounting to `acc`; shared by plan and train so both count the
    same way. Returns the adapted model."""
    base_pb = accounting.param_buffer_bytes(model)
    targets = [t for t in targets if adapter_target(t, spec.peft_targets)]
    if spec.peft_per_module:
        peft_model = amod.attach(model, targets, spec.peft, per_module=spec.peft_per_module)
    else:
        peft_model = amod.attach(model, targets, spec.peft)
    acc.update(accounting.adapter_sizes(peft_model, base_pb, acc["total_params"]))
    acc["qlora_recipe_overhead_bytes"] = accounting.qlora_recipe_overhead_bytes(model, acc["peft_overhead_bytes"])
    return peft_model


# ----------------------------------------------------------------------------------------------------------------
# Train mode
# ----------------------------------------------------------------------------------------------------------------


class Base(typing.NamedTuple):
    """The quantized base and its data, as fine-tuning and re-evaluation both start from them."""

    tokenizer: typing.Any
    train_set: list
    val_set: list
    model: torch.nn.Module
    targets: list
    compute_dtype: str
    torch_dtype: torch.dtype


def budgeted(spec: RunSpec, device: str) -> tuple[RunSpec, dict | None]:
    """train.memory_budget: the spec with checkpointing, upcast and loss chunking chosen to fit (speed.choose, from
    plan mode's estimate, which models the plain path and so leaves the fused one some headroom), and the record of
    that choice; the spec as it is without a budget."""
    t = spec.train
    if t.memory_budget is None:
        return spec, None
    budget = speed.budget_bytes(t.memory_budget, device)
    acc = plan_accounting(spec)

    def peak(settings: dict) -> int | None:
        trial = dataclasses.replace(spec, train=dataclasses.replace(t, **settings))
        return plan_estimate(trial, acc).get("peak_memory_bytes")

    settings, estimated = speed.choose(budget, peak)
    # the chunked loss where it applies (not under FSDP, recipe.fine_tune); the estimate models the whole one anyway
    settings = {**settings, "chunked_loss": 0 if t.distributed == "fsdp" else t.chunked_loss or speed.BUDGET_CHUNK}
    log.info(
        "train.memory_budget=%s (%.1f GiB): %s, estimated peak %.1f GiB",
        t.memory_budget,
        budget / speed.GIB,
        settings,
        estimated / speed.GIB,
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
) -> None:
    t_enter = time.perf_counter()
    spec, budget = budgeted(spec, device)
    d, t = spec.data, spec.train
    torch.manual_seed(spec.seed)
    # under FSDP only process 0 rebuilds the base after training: the others keep no CPU copy of it
    tokenizer, train_set, val_set, model, targets, compute_dtype, torch_dtype = load_base(
        spec, device, record, save, progress, keep=world.main or t.distributed != "fsdp"
    )
    acc = record["accounting"]

    # 4. The quantized base before fine-tuning (the "no fine-tuning" row of the tables), cached across a sweep.
    evaluate = functools.partial(run_eval, spec, tokenizer, val_set, device, torch_dtype, progress, record)
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
    switches = speed.setup(
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
    with speed.loss_context(peft_model, chunk):
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

    speed.teardown(peft_model)
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


def load_base(spec: RunSpec, device: str, record: dict, save, progress: bool, keep: bool = True) -> Base:
    """Steps 1-3: the data split, the base model in its dtype (counted) and quantized in place (errors measured).
    `keep`: leave a CPU copy for the next run of this process (train.reuse_base)."""
    d, t = spec.data, spec.train
    source = d.path or d.hub_id

    # 1. Data: fixed 80/20 split; loss on responses only unless train_on_source.
    tokenizer = models.load_tokenizer(spec.model.path or spec.model.hub_id)
    examples = data.load_examples(
        d.format, path=d.path, hub_id=d.hub_id, variant=d.variant, max_examples=d.max_examples
    )
    train_ex, val_ex = data.split_train_val(examples, d.val_fraction, d.split_seed)
    tok = functools.partial(
        data.tokenize_examples,
        tokenizer=tokenizer,
        max_source_len=d.max_source_len,
        max_target_len=d.max_target_len,
        train_on_source=d.train_on_source,
    )
    train_set, val_set = tok(train_ex), tok(val_ex)
    if not train_set or not val_set:
        raise ValueError(
            f"data {source!r}: {len(train_set)} train / {len(val_set)} validation examples after "
            "tokenization; need at least one of each"
        )
    record["data"] = {
        "source": source,
        "examples": len(examples),
        "train_examples": len(train_set),
        "val_examples": len(val_set),
    }
    log.info("data: %d examples -> %d train / %d validation", len(examples), len(train_set), len(val_set))

    # 2. Load the base in its dtype and count it before quantization changes the tensors.
    compute_dtype = spec.model.dtype if t.compute_dtype == "auto" else t.compute_dtype
    torch_dtype = models.DTYPE[compute_dtype]
    key = _base_key(spec, compute_dtype, device)
    if key is not None and key in _BASE_CACHE:  # a sweep's earlier run quantized this base already: reuse it
        t0 = time.perf_counter()
        cached, record["quant"], acc = copy.deepcopy(_BASE_CACHE[key])
        model = cached.to(device)
        record["quant"]["reused"] = {"from": "process cache", "seconds": time.perf_counter() - t0}
        record["accounting"] = acc
        log.info("quantized base reused from this process' cache in %.2f s", record["quant"]["reused"]["seconds"])
        save()
        return Base(
            tokenizer,
            train_set,
            val_set,
            model,
            list(models.find_linears(model, spec.model.linear_names)),
            compute_dtype,
            torch_dtype,
        )
    layerwise = t.distributed == "fsdp"  # every process builds its own base: one layer in full precision at a time
    if layerwise:
        model = models.empty_model(spec.model.arch_dict(), spec.model.dtype)
        model.config._name_or_path = spec.model.path  # where LoftQ finds the unquantized weights, as when loaded
        source = models.TensorSource(spec.model.path, spec.model.dtype)
    else:
        model = models.load_model(spec.model.path or spec.model.hub_id, spec.model.dtype, device)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    targets = list(models.find_linears(model, spec.model.linear_names))
    acc = accounting.base_sizes(model)

    # 3. Quantize the target linears in place, measuring each layer's weight and output error on the probe (not
    # when loading layer by layer: the probe's inputs need the whole model in full precision).
    windows = None if layerwise else calibration_windows(spec.calib, tokenizer, train_ex)
    probe = None if windows is None else windows[: spec.calib.probe_samples]
    fill = models.layerwise(model, targets, source, device) if layerwise else None
    record["quant"] = quant.quantize_model(
        spec.quant_name,
        model,
        targets,
        spec.quant,
        compute_dtype,
        device,
        windows=windows,
        probe=probe,
        progress=progress,
        fill=fill,
    )
    record["quant"]["layerwise_load"] = layerwise
    if windows is not None:
        record["quant"]["calibration"] = {
            "source": spec.calib.source,
            "windows": windows.shape[0],
            "seq_len": windows.shape[1],
            "tokens": windows.numel(),
        }
    acc.update(accounting.measured_quantized_sizes(model, targets, quant.get(spec.quant_name).state_bytes))
    record["accounting"] = acc
    q = record["quant"]
    log.info(
        "quantized %d layers in %.2f s (+%.2f s calibration): weight error %.4f, output error %s",
        len(targets),
        q["quantize_time_s"],
        q["calibration_time_s"],
        q["weight_rel_error"],
        "-" if q["output_rel_error"] is None else f"{q['output_rel_error']:.4f}",
    )
    save()
    if key is not None and keep:
        _BASE_CACHE.clear()  # one base at a time: a sweep ordered by (model, quantizer) reuses each while it lasts
        model.to("cpu")  # moved, not copied, so the GPU never holds two bases
        _BASE_CACHE[key] = copy.deepcopy((model, record["quant"], acc))
        model.to(device)
    return Base(tokenizer, train_set, val_set, model, targets, compute_dtype, torch_dtype)


# The quantized base of the last run in this process, on the CPU, for the next run of a sweep with the same model
# and quantizer (Hydra's default launcher runs a grid in one process). Only formats whose every tensor follows
# Module.to() qualify (quant modules with PROCESS_REUSE = True): HQQ keeps scales and zeros in a plain dict that
# .to() does not move, so an HQQ base is quantized again each run.
_BASE_CACHE: dict[str, tuple] = {}


def _base_key(spec: RunSpec, compute_dtype: str, device: str) -> str | None:
    if not spec.train.reuse_base or not getattr(quant.get(spec.quant_name), "PROCESS_REUSE", False):
        return None
    calib = dataclasses.asdict(spec.calib)
    uses_data = spec.calib.enabled and spec.calib.source == "finetune"  # windows cut from the training split
    layerwise = spec.train.distributed == "fsdp"  # no probe, so its record says less: not another run's base
    return json.dumps(
        [
            spec.model.path or spec.model.hub_id,
            spec.model.dtype,
            dataclasses.asdict(spec.model),
            spec.quant_name,
            dataclasses.asdict(spec.quant),
            calib,
            compute_dtype,
            device,
            layerwise,
            dataclasses.asdict(spec.data) if uses_data else None,
        ],
        sort_keys=True,
        default=str,
    )


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
    ev = spec.eval
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
    )
    record["eval"].setdefault(stage, {}).update(out)
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
    }
    return evaluation.BaseEvalCache(identity, evaluation.cache_settings(spec.eval))


def calibration_windows(calib, tokenizer, train_examples: list[dict]):
    """Calibration token windows (samples, seq_len) from the configured source, or None for calib=none."""
    if not calib.enabled:
        return None
    texts = (
        calibration.example_texts(train_examples) if calib.source == "finetune" else calibration.read_text(calib.path)
    )
    return calibration.token_windows(tokenizer, texts, calib.samples, calib.seq_len, calib.seed)


def _batches(features: list[dict], batch_size: int, pad_id: int, seed: int, group: bool, limit: int | None = None):
    order = data.make_batches([len(f["input_ids"]) for f in features], batch_size, seed=seed, group_by_length=group)
    for idx in order[:limit]:
        yield data.collate([features[i] for i in idx], pad_id)


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


# ----------------------------------------------------------------------------------------------------------------
# The short summary printed at the end of a run
# ----------------------------------------------------------------------------------------------------------------

GIB, MIB = 2**30, 2**20


def summary_line(record: dict, path: Path) -> str:
    """'<status> <run id> in 1m23s | loss 2.31 -> 1.87 | ppl_heldout 12.3 -> 9.81 | 0.123 s/step | peak 1.20 GiB
    | <record>': the run's outcome on one line (fields a run does not have are left out)."""
    meta, tr, ev = record.get("meta", {}), record.get("train", {}), record.get("eval", {})
    parts = [f"{record['status']} {record['run_id']}"]
    try:
        seconds = (
            datetime.fromisoformat(meta["end_time"]) - datetime.fromisoformat(meta["start_time"])
        ).total_seconds()
        parts[0] += f" in {int(seconds) // 60}m{int(seconds) % 60:02d}s"
    except (KeyError, TypeError, ValueError):
        pass
    if tr.get("losses"):
        parts.append(f"loss {tr['losses'][0]:.4g} -> {tr['final_loss']:.4g}")
    for task, _, _ in evaluation.SUMMARIES:
        before, after = (evaluation.headline(ev.get(stage, {}).get(task), task) for stage in ("before", "after"))
        if after is not None:
            parts.append(f"{task} {'-' if before is None else format(before, '.4g')} -> {after:.4g}")
    if tr.get("s_per_step") is not None:
        parts.append(f"{tr['s_per_step']:.3g} s/step")
    if tr.get("peak_memory_bytes") is not None:
        parts.append(f"peak {tr['peak_memory_bytes'] / GIB:.2f} GiB")
    if record.get("error"):
        parts.append(f"{record['error']['type']}: {str(record['error']['message']).splitlines()[0][:120]}")
    if record["status"] == "diverged" and "diverged_at_step" in tr:
        parts.append(f"diverged at step {tr['diverged_at_step']}")
    parts.append(str(path))
    return " | ".join(parts)


def summary_table(record: dict, path: Path) -> str:
    cfg, acc, tr, ev = record["config"], record.get("accounting", {}), record.get("train", {}), record.get("eval", {})
    q = record.get("quant", {})
    peft = cfg.get("peft", {})

    def fmt(value, spec: str, scale: int = 1) -> str:
        return "-" if value is None else format(value / scale if scale != 1 else value, spec)

    rows = [
        ("run", f"{record['run_id']}  status: {record['status']}"),
        (
            "model / quant / method",
            f"{cfg['model']['name']} / {cfg['quant']['name']} / {peft.get('name', peft.get('method'))}"
            + (f" r={peft['r']} alpha={peft['alpha']}" if "r" in peft else ""),
        ),
        ("trainable params", f"{fmt(acc.get('trainable_params'), ',')} ({fmt(acc.get('trainable_pct'), '.4f')} %)"),
        (
            "quantized size (GiB)",
            f"{fmt(acc.get('quantized_model_bytes'), '.4f', GIB)} stored, "
            f"{fmt(acc.get('param_buffer_bytes'), '.4f', GIB)} params+buffers",
        ),
        (
            "PEFT overhead (MiB)",
            f"{fmt(acc.get('peft_overhead_bytes'), '.3f', MIB)} adapters, "
            f"{fmt(acc.get('qlora_recipe_overhead_bytes'), '.3f', MIB)} as qlora.py's set-up",
        ),
        ("bits per weight", fmt(acc.get("bits_per_weight"), ".3f")),
    ]
    if record.get("peft_layers"):  # per-layer-group knobs: how many modules got which values
        combos: dict[str, int] = {}
        for knobs in record["peft_layers"].values():
            key = " ".join(f"{k}={v}" for k, v in knobs.items())
            combos[key] = combos.get(key, 0) + 1
        rows.append(("per-layer knobs", "; ".join(f"{k}: {n} modules" for k, n in combos.items())))
    est = record.get("estimate", {})
    if est.get("peak_memory_bytes") is not None:
        per = f", per GPU of {est['gpus']} ({est['distributed']})" if est.get("gpus", 1) > 1 else ""
        rows.append(
            (
                "est. peak GPU memory (GiB)",
                f"{est['peak_memory_bytes'] / GIB:.2f} (train mode, batch "
                f"{cfg['train']['batch_size']} x {est['seq_len']} tokens{per})",
            )
        )
        rows.append(
            (
                "est. time on one H100",
                f"{est['s_per_step']:.3f} s/step, {est['run_seconds'] / 3600:.2f} h "
                f"for {cfg['train']['max_steps']} steps",
            )
        )
    if q:
        rows.append(
            (
                "quant error weight / output",
                f"{fmt(q.get('weight_rel_error'), '.4f')} / "
                f"{fmt(q.get('output_rel_error'), '.4f')} (relative, mean over "
                f"layers), {fmt(q.get('quantize_time_s'), '.2f')} s",
            )
        )
    if tr.get("s_per_step") is not None:
        rows += [
            ("s/step, tokens/s", f"{tr['s_per_step']:.3f}, {tr['tokens_per_s']:.0f}"),
            (f"peak memory (GiB, {tr.get('memory_kind')})", fmt(tr.get("peak_memory_bytes"), ".3f", GIB)),
            ("loss first -> last", f"{tr['losses'][0]:.4f} -> {tr['final_loss']:.4f}"),
        ]
    for task, label, spec_ in evaluation.SUMMARIES:
        before, after = (evaluation.headline(ev.get(stage, {}).get(task), task) for stage in ("before", "after"))
        if before is not None or after is not None:
            rows.append((f"{label} before -> after", f"{fmt(before, spec_)} -> {fmt(after, spec_)}"))
    sp = ev.get("after", {}).get("speed")
    if sp:
        rows.append(
            (
                "generation tok/s, fwd / bwd ms",
                f"{sp['generation']['tokens_per_s']:.1f}, "
                f"{sp['step']['forward_ms']:.1f} / {sp['step']['backward_ms']:.1f}",
            )
        )
    if "error" in record:
        rows.append(("error", f"{record['error']['type']}: {record['error']['message']}"))
    rows.append(("record", str(path)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
