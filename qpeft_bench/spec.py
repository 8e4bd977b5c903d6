"""The run's specification: the composed config checked as a whole and turned into a `RunSpec`.

`config.py` checks each section on its own and imports nothing from the package; the checks here combine sections
or ask the component that owns a rule (the quantizer and adapter registries, the speed switches, the eval
section's checks, the architecture's shapes), so this module sits above the components and below the recipe.
No model is loaded: a typo or an impossible combination fails in a second with one actionable line.
"""

from __future__ import annotations

import dataclasses

from qpeft_bench import adapters, distributed, quant, speedups
from qpeft_bench.config import (
    CalibConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    RunSpec,
    TrainConfig,
    adapter_target,
    from_dict,
    type_ok,
)
from qpeft_bench.evaluation.checks import check_eval
from qpeft_bench.layers import apply_variant, per_module_configs
from qpeft_bench.model_identity import check_checkpoint, resolve_family
from qpeft_bench.models import linear_shapes, resolve_device
from qpeft_bench.quantized_base import check_load_by_block


def _split_named(section: dict, key: str, where: str) -> tuple[str, dict]:
    if not isinstance(section, dict) or key not in section:
        raise ConfigError(f"{where}.{key} is required (which option of the {where} group)")
    rest = dict(section)
    return rest.pop(key), rest


def validate(cfg: dict) -> RunSpec:
    """Check a composed config (a plain dict, resolved) and return typed pieces. No model is loaded."""
    groups = ("model", "quant", "peft", "data", "calib", "train", "eval")
    missing = [g for g in groups if g not in cfg]
    if missing:
        raise ConfigError(f"config group(s) {', '.join(missing)} missing; choose an option, e.g. model=tiny_llama")
    top = from_dict(RunConfig, {k: v for k, v in cfg.items() if k not in groups and k != "hydra"}, "")

    model = from_dict(ModelConfig, cfg["model"], "model")
    check_checkpoint(model, "model")  # the card names the model that will load
    model = resolve_family(model, "model")
    quant_name, quant_knobs = _split_named(cfg["quant"], "name", "quant")
    qmod = quant.get(quant_name)
    fixed = quant.preset(quant_name)
    clash = {k: v for k, v in quant_knobs.items() if k in fixed and v != fixed[k]}
    if clash:
        raise ConfigError(f"quant={quant_name} fixes {fixed}; remove {clash} or choose another quant option")
    qcfg = from_dict(qmod.Config, {**quant_knobs, **fixed}, "quant")
    peft_method, peft_knobs = _split_named(cfg["peft"], "method", "peft")
    peft_name = peft_knobs.pop("name", peft_method)
    peft_targets = peft_knobs.pop("targets", None)
    by_layer = peft_knobs.pop("by_layer", None) or {}
    layer_groups = peft_knobs.pop("layer_groups", None) or {}
    variant = peft_knobs.pop("variant", None) or []
    if not isinstance(by_layer, dict) or not isinstance(layer_groups, dict):
        raise ConfigError(
            "peft.by_layer and peft.layer_groups must be mappings ({group: {knob: value}}, {group: regex})"
        )
    for group, knobs in by_layer.items():
        if knobs is not None and not isinstance(knobs, dict):
            raise ConfigError(f"peft.by_layer.{group}={knobs!r}: expected a mapping of knobs, e.g. {{r: 8}}")
    if not type_ok(variant, list[str]):
        raise ConfigError(f"peft.variant={variant!r}: a list of edits such as [mlp.r/2, attn.balance:4]")
    amod = adapters.get(peft_method)
    pcfg = from_dict(amod.Config, peft_knobs, "peft")
    if peft_targets is not None:
        if not type_ok(peft_targets, list[str]) or not peft_targets:
            raise ConfigError(f"peft.targets={peft_targets!r}: a non-empty list of linear names, or null for all")
        outside = sorted(set(peft_targets) - set(model.linear_names))
        if outside:
            raise ConfigError(
                f"peft.targets {outside} are not among model.linear_names {model.linear_names} "
                "(the quantized linears adapters can sit on)"
            )
    spec = RunSpec(
        mode=top.mode,
        seed=top.seed,
        model=model,
        quant_name=quant_name,
        quant=qcfg,
        peft_method=peft_method,
        peft_name=peft_name,
        peft=pcfg,
        peft_targets=peft_targets,
        data=from_dict(DataConfig, cfg["data"], "data"),
        calib=from_dict(CalibConfig, cfg["calib"], "calib"),
        train=from_dict(TrainConfig, cfg["train"], "train"),
        eval=from_dict(EvalConfig, cfg["eval"], "eval"),
        overwrite=top.overwrite,
        run_dir=top.run_dir,
    )
    device = None
    if spec.mode in ("train", "eval"):
        spec.train.check_device()
        device = resolve_device(spec.train.device)
    if spec.train.distributed == "fsdp":
        spec.quant = distributed.check_fsdp(spec)
    speedups.check(peft_method, spec.train.fused_lora, spec.train.compile, spec.train.distributed)
    quant.check_runnable(quant_name, qmod, model.family, device, spec.calib.enabled)
    check_load_by_block(spec)
    # Checks that need the architecture (sizes that must divide, ranks that must fit) read only config.json.
    try:
        shapes = linear_shapes(model.arch_dict(), model.dtype, model.linear_names)
    except ValueError as err:  # a linear name that matches nothing, or an arch transformers rejects
        raise ConfigError(f"model {model.name!r}: {err}") from err
    qmod.check_against_arch(qcfg, shapes)
    adapted = {n: s for n, s in shapes.items() if adapter_target(n, peft_targets)}
    amod.check_against_arch(pcfg, adapted)
    arch = model.arch_dict()
    by_layer = apply_variant(variant, by_layer, dataclasses.asdict(pcfg))
    spec.peft_per_module = per_module_configs(
        pcfg,
        sorted(adapted),
        arch.get("num_hidden_layers", 0),
        by_layer,
        layer_groups,
        getattr(amod, "PER_LAYER_KNOBS", ()),
        peft_method,
    )
    for name, module_cfg in spec.peft_per_module.items():  # the size rules, with each module's own knobs
        amod.check_against_arch(module_cfg, {name: adapted[name]})
    why = adapters.unsupported(amod, quant_name, qcfg, pcfg)
    if why:
        raise ConfigError(f"peft={peft_name} cannot run on quant={quant_name}: {why}")
    compute = model.dtype if spec.train.compute_dtype == "auto" else spec.train.compute_dtype
    adapter_dtype = getattr(pcfg, "adapter_dtype", "float32")
    if spec.mode == "train" and compute == "float16" and adapter_dtype != "float32":
        raise ConfigError(
            f"train.compute_dtype resolves to float16 (model.dtype={model.dtype}) with "
            f"peft.adapter_dtype={adapter_dtype}: fp16 loss scaling cannot unscale 16-bit gradients; "
            "set peft.adapter_dtype=float32 or train.compute_dtype=bfloat16"
        )
    context = model.arch_dict().get("max_position_embeddings")
    check_eval(spec.eval, context, model.name)
    longest = spec.data.max_source_len + spec.data.max_target_len
    if context is not None and longest > context:
        raise ConfigError(
            f"data.max_source_len + data.max_target_len = {longest} exceeds the context length "
            f"{context} of model {model.name!r}; lower them"
        )
    if context is not None and spec.calib.enabled and spec.calib.seq_len > context:
        raise ConfigError(
            f"calib.seq_len={spec.calib.seq_len} exceeds the context length {context} of model {model.name!r}; lower it"
        )
    return spec
