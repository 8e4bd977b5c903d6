"""Steps 1-3 of a run: the data split, the base model loaded and counted, then quantized in place.

Fine-tuning, re-evaluation and the rebuild after sharded training all start from `load_base`. Within one process a
sweep's next run with the same model and quantizer reuses the last quantized base from a CPU copy (`_BASE_CACHE`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
import typing

import torch

from qpeft_bench import accounting, calibration, data, fingerprint, models, quant
from qpeft_bench.config import ConfigError, RunSpec

log = logging.getLogger("qpeft_bench")


class Base(typing.NamedTuple):
    """The quantized base and its data, as fine-tuning and re-evaluation both start from them."""

    tokenizer: typing.Any
    train_set: list
    val_set: list
    model: torch.nn.Module
    targets: list
    compute_dtype: str
    torch_dtype: torch.dtype


def load_base(
    spec: RunSpec,
    device: str,
    record: dict,
    save,
    progress: bool,
    keep: bool = True,
    prepared: tuple[typing.Any, data.Prepared] | None = None,
) -> Base:
    """Steps 1-3: the data split, the base model in its dtype (counted) and quantized in place (errors measured).
    `keep`: leave a CPU copy for the next run of this process (train.reuse_base). `prepared`: the tokenizer and the
    data as the recipe's pre-flight already prepared them (data.prepare), else they are prepared here."""
    d, t = spec.data, spec.train
    source = d.path or d.hub_id

    # 1. Data: fixed 80/20 split; loss on responses only unless train_on_source.
    if prepared is None:
        tokenizer = models.load_tokenizer(spec.model.path or spec.model.hub_id)
        prepared = tokenizer, data.prepare(d, tokenizer)
    tokenizer, (n_examples, train_ex, train_set, val_set) = prepared
    record["data"] = {
        "source": source,
        "examples": n_examples,
        "train_examples": len(train_set),
        "val_examples": len(val_set),
    }
    log.info("data: %d examples -> %d train / %d validation", n_examples, len(train_set), len(val_set))

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
    layerwise = loads_by_block(spec)  # one layer (one block) in full precision at a time
    if layerwise:
        where = models.checkpoint_dir(spec.model.path, spec.model.hub_id)
        model = models.empty_model(spec.model.arch_dict(), spec.model.dtype)
        model.config._name_or_path = where  # where LoftQ finds the unquantized weights, as when loaded
        source = models.TensorSource(where, spec.model.dtype)
        log.info("base brought in block by block from %s", where)
    else:
        model = models.load_model(spec.model.path or spec.model.hub_id, spec.model.dtype, device)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    targets = list(models.find_linears(model, spec.model.linear_names))
    acc = accounting.base_sizes(model)

    # 3. Quantize the target linears in place, measuring each layer's weight and output error on the probe (not
    # when loading layer by layer for a one-pass quantizer: its probe's inputs need the whole model in full
    # precision; block by block, each block's probe runs on the quantized blocks' outputs).
    one_pass_only = layerwise and not calibrates_by_block(spec)
    windows = None if one_pass_only else calibration_windows(spec.calib, tokenizer, train_ex)
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
        sequential=spec.calib.sequential,
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
    if not spec.train.reuse_base or not quant.capability(spec.quant_name, "PROCESS_REUSE"):
        return None
    calib = dataclasses.asdict(spec.calib)
    uses_data = spec.calib.enabled and spec.calib.source == "finetune"  # windows cut from the training split
    layerwise = loads_by_block(spec)  # possibly no probe, so its record says less: not another run's base
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
            fingerprint.spec_inputs(spec, ("model", "calib", "data") if uses_data else ("model", "calib")),
        ],
        sort_keys=True,
        default=str,
    )


def calibrates_by_block(spec: RunSpec) -> bool:
    """Whether the quantizer's statistics come block by block (calib.sequential and a SEQUENTIAL quantizer)."""
    c = spec.calib
    return c.enabled and c.sequential and quant.capability(spec.quant_name, "SEQUENTIAL")


def loads_by_block(spec: RunSpec, *, planning: bool = False) -> bool:
    """Whether the base is read in from its checkpoint one block at a time (calib.load_by_block; FSDP always:
    every process builds its own base). check_load_by_block has refused what cannot be. `planning` (plan mode,
    often before the weights are downloaded): a hub checkpoint not cached here is taken to be safetensors, as the
    hub's checkpoints of these models are."""
    choice = spec.calib.load_by_block
    if spec.train.distributed == "fsdp" or choice is True:
        return True
    if choice is False or not calibrates_by_block(spec):
        return False
    if planning and spec.model.path is None:
        return True
    return models.checkpoint_dir(spec.model.path, spec.model.hub_id) is not None


def check_load_by_block(spec: RunSpec) -> None:
    """Compose time: a by-block load needs safetensors to read from, and a quantizer that does not calibrate in one
    pass of the whole model."""
    if not (spec.train.distributed == "fsdp" or spec.calib.load_by_block is True) or spec.mode not in ("train", "eval"):
        return
    why = "train.distributed=fsdp" if spec.train.distributed == "fsdp" else "calib.load_by_block=true"
    if models.checkpoint_dir(spec.model.path, spec.model.hub_id) is None:
        if spec.model.path is not None:
            where = f"model.path={spec.model.path} has no model.safetensors(.index.json): save it as safetensors"
        else:
            where = f"model.hub_id={spec.model.hub_id} has no safetensors weights in the local HF cache: download them"
        fix = "" if spec.train.distributed == "fsdp" else " or set calib.load_by_block=false"
        raise ConfigError(f"{why} reads the checkpoint one block at a time from safetensors files; {where}{fix}")
    qmod = quant.get(spec.quant_name)
    if why == "calib.load_by_block=true" and not calibrates_by_block(spec) and not quant.needs_calibration(qmod):
        # read by block, the per-layer output errors (measured on the whole unquantized model's inputs) are lost,
        # and the run id, which this knob does not enter, would name two different records
        raise ConfigError(
            f"calib.load_by_block=true reads the base by block for quantizers calibrated block by block (gptq, owq, "
            f"qeft); quant={spec.quant_name} is quantized layer by layer after a whole load: leave it at auto"
        )
    one_pass = quant.capability(qmod, "prepare") is not quant.QuantizerModule.prepare and not calibrates_by_block(spec)
    if one_pass and spec.calib.enabled:
        raise ConfigError(
            f"{why}: quant={spec.quant_name} calibrates in one pass of the whole model (its statistics "
            + ("need calib.sequential=true" if quant.capability(qmod, "SEQUENTIAL") else "are not block by block")
            + "), which a by-block load never holds: set calib.load_by_block=false"
        )


def calibration_windows(calib, tokenizer, train_examples: list[dict]):
    """Calibration token windows (samples, seq_len) from the configured source, or None for calib=none."""
    if not calib.enabled:
        return None
    texts = (
        calibration.example_texts(train_examples) if calib.source == "finetune" else calibration.read_text(calib.path)
    )
    return calibration.token_windows(tokenizer, texts, calib.samples, calib.seq_len, calib.seed)
