"""Plan mode: a run's storage accounting and its estimated peak memory and time, from the architecture card alone.

No weights are loaded: the model is built on the meta device, each target linear is sized in its quantizer's storage
format and the adapters are attached on meta. `with_adapters` is shared with training so both count the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch

from qpeft_bench import accounting, adapters, estimate, models, quant, quantized_base
from qpeft_bench.config import ConfigError, RunSpec, adapter_target


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
            output_follows_input_dtype=quant.capability(spec.quant_name, "OUTPUT_FOLLOWS_INPUT_DTYPE"),
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
    out = {
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
    if quant.needs_calibration(quant.get(spec.quant_name)):
        out["calibration"] = plan_calibration(spec, acc)
    return out


def plan_calibration(spec: RunSpec, acc: dict) -> dict:
    """Calibration's peak device memory and time for a quantizer that needs calibration data (estimate.py)."""
    c, name = spec.calib, spec.quant_name
    # Hessians for the GPTQ family; one value per input channel for SmoothQuant and for QEFT's round-to-nearest.
    nearest = getattr(spec.quant, "method", "gptq") == "nearest"
    statistic = "channel" if name == "smoothquant" or nearest else "hessian"
    sequential = c.sequential and name in estimate.SEQUENTIAL_QUANTIZERS
    by_block = sequential and quantized_base.loads_by_block(spec, planning=True)
    arch = spec.model.arch_dict()
    kw = {"samples": c.samples, "seq_len": c.seq_len, "sequential": sequential, "statistic": statistic}
    try:
        mem = estimate.calibration_memory(
            arch,
            **kw,
            model_dtype=spec.model.dtype,
            base_model_bytes=acc["base_model_bytes"],
            quantized_model_bytes=acc["quantized_model_bytes"],
            loaded_by_block=by_block,
        )
        time = estimate.calibration_seconds(arch, **kw)
    except ConfigError as err:
        return {"unavailable": str(err)}
    return {
        **mem,
        **time,
        "samples": c.samples,
        "seq_len": c.seq_len,
        "basis": "estimate: one H100-class GPU; the unquantized model "
        + ("read one block at a time from its safetensors checkpoint" if by_block else "loaded whole")
        + ", as the run does (calib.load_by_block; qpeft_bench/estimate.py)",
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
