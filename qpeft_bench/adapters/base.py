"""What our own adapters (QA-LoRA, Q-BaRA, QA-HiRA, IR-QLoRA's IEC, weak-column tuning) share.

An adapter layer wraps the frozen base linear of any quantizer (`base`: nn.Linear, bitsandbytes, HQQ or one of our
formats) and adds a trainable path: y = base(x) + delta(x). The model stays a plain transformers model (no peft
wrapper), so everything else (training loop, evaluation, accounting) works unchanged.

Saved format (directory): `adapter_config.json` = {"format": FORMAT, "version": VERSION, "method": ..., "config":
{...}, "targets": [...], "per_module": {...}}, and `adapter_model.safetensors` holding every tensor whose name contains
".adapter." (the trainable parameters and any adapter buffers), keyed by their full module path in the model.
"per_module" (methods with per-layer-group knobs, peft.by_layer) is {module: {knob: value}} holding only the knobs
whose value differs from "config" (a module with none is left out; {} for a uniform adapter); a file without the key,
written before per-group knobs existed, reads as {}. `load` rebuilds each module with its own knobs and refuses a
file whose per-module knobs differ from the ones asked, naming the module and both values.

Exact merges into group-wise zero points (QA-LoRA, and Q-BaRA/QA-HiRA when their pooling blocks cover whole
quantization groups): a weight update that is constant over each quantization group of a row, dW[o, j] = d[o, g(j)],
is absorbed by the zero point, since (c - z) s + d = (c - (z - d / s)) s. `merge_group_constant` does that for
each quantizer with group-wise zero points.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qpeft_bench import quant
from qpeft_bench.config import DTYPES, ConfigError

FORMAT = "qpeft-bench/adapter"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class MergeUnsupported(NotImplementedError):
    """This method (or this method on this quantizer) has no exact merge; the message says why."""


class AdapterLinear(nn.Module):
    """Frozen `base` + trainable `adapter` (a sub-module, so saved tensors are found by the '.adapter.' name).

    `knobs` holds the values of the method's per-layer knobs this layer was built with (set by attach_method), so
    that `save` can record them without being handed the per-module configs."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.knobs: dict = {}

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.delta(x).to(y.dtype)

    def describe(self) -> dict:
        """The knobs this layer really has (checked against the config after attaching)."""
        raise NotImplementedError

    def merge(self) -> nn.Module:
        """The base with the adapter folded in, computing the same function with no extra path."""
        raise MergeUnsupported(f"{type(self).__name__} has no merge")


def attach_wrappers(model: nn.Module, targets: list[str], make: Callable[[str, nn.Module], AdapterLinear]) -> nn.Module:
    """Freeze every parameter, then replace each target by make(name, module); adapter parameters stay trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        model.set_submodule(name, make(name, model.get_submodule(name)))
    return model


def attach_method(
    model: nn.Module,
    targets: list[str],
    cfg,
    per_module: dict | None,
    tunable: tuple[str, ...],
    make: Callable[[str, nn.Module, object], AdapterLinear],
) -> nn.Module:
    """attach_wrappers where each target is built by make(name, layer, its Config): per_module[name] if given, else
    cfg. Each wrapper keeps the values of its `tunable` knobs (AdapterLinear.knobs) for save_method."""

    def wrap(name: str, layer: nn.Module) -> AdapterLinear:
        module_cfg = (per_module or {}).get(name, cfg)
        wrapper = make(name, layer, module_cfg)
        wrapper.knobs = {k: getattr(module_cfg, k) for k in tunable}
        return wrapper

    return attach_wrappers(model, targets, wrap)


def verify_wrappers(model: nn.Module, targets: list[str], cls: type, expected: Callable[[str], dict]) -> None:
    """Every target must be wrapped by `cls` with exactly the knobs asked for; nothing else may be wrapped."""
    wrapped = {n for n, m in model.named_modules() if isinstance(m, AdapterLinear)}
    if wrapped != set(targets):
        missing, extra = sorted(set(targets) - wrapped), sorted(wrapped - set(targets))
        raise RuntimeError(f"adapters on the wrong modules: missing {missing[:3]}, unexpected {extra[:3]}")
    for name in targets:
        layer = model.get_submodule(name)
        if not isinstance(layer, cls):
            raise RuntimeError(f"{name}: expected {cls.__name__}, got {type(layer).__name__}")
        got, want = layer.describe(), expected(name)
        if got != want:
            raise RuntimeError(f"{name}: adapter has {got}, asked for {want}")


def merge_all(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by its merge (raises MergeUnsupported naming the first that cannot)."""
    names = [n for n, m in model.named_modules() if isinstance(m, AdapterLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).merge())
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if ".adapter." in k}


def save_wrappers(
    model: nn.Module, path: str | Path, method: str, config: dict, per_module: dict[str, dict] | None = None
) -> None:
    targets = sorted(n for n, m in model.named_modules() if isinstance(m, AdapterLinear))
    save_tensors(path, method, config, targets, adapter_state(model), per_module)


def save_tensors(
    path: str | Path,
    method: str,
    config: dict,
    targets: list[str],
    tensors: dict[str, torch.Tensor],
    per_module: dict[str, dict] | None = None,
) -> None:
    """Write the saved-adapter format (also for methods whose trained tensors live outside wrappers);
    `per_module`: the sparse {module: {knob: value}} of per-layer knobs (left out of the file when None)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path / WEIGHTS_FILE))
    meta = {"format": FORMAT, "version": VERSION, "method": method, "config": config, "targets": targets}
    if per_module is not None:
        meta["per_module"] = per_module
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def save_method(
    model: nn.Module, path: str | Path, method: str, cfg, tunable: tuple[str, ...] = (), per_module: dict | None = None
) -> None:
    """`save` of a wrapper-based method: its tensors, its config dataclass and the per-layer knobs each wrapper was
    built with. `per_module` ({module: Config}, optional): the knobs asked for; the wrappers must have them."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}
    have = {n: m.knobs for n, m in layers.items()}
    if per_module is not None:
        check_knobs(have, module_knobs(cfg, per_module, sorted(layers), tunable), "the model")
    save_wrappers(model, path, method, dataclasses.asdict(cfg), sparse_knobs(have, cfg))


def load_method(
    attach: Callable,
    model: nn.Module,
    targets: list[str],
    cfg,
    path: str | Path,
    method: str,
    tunable: tuple[str, ...] = (),
    per_module: dict | None = None,
):
    """`load` of a wrapper-based method: same knobs (per module too) and modules as saved (else ValueError), attach
    with the per-module configs, copy the tensors."""
    meta, tensors = read_saved(path, method)
    check_saved(meta, targets, dataclasses.asdict(cfg), module_knobs(cfg, per_module, targets, tunable))
    model = attach(model, targets, cfg, per_module=per_module)
    load_state(model, tensors)
    return model


# Per-module knob tables {module: {knob: value}}: what a saved adapter holds against what a config asks


def module_knobs(cfg, per_module: dict | None, targets: list[str], tunable: tuple[str, ...]) -> dict[str, dict]:
    """The values of the `tunable` knobs each target gets: from its Config in `per_module`, else from `cfg`."""
    return {t: {k: getattr((per_module or {}).get(t, cfg), k) for k in tunable} for t in targets}


def sparse_knobs(knobs: dict[str, dict], cfg) -> dict[str, dict]:
    """Only the values that differ from cfg's (the "per_module" entry of adapter_config.json)."""
    out = {name: {k: v for k, v in values.items() if v != getattr(cfg, k)} for name, values in knobs.items()}
    return {name: values for name, values in sorted(out.items()) if values}


def check_knobs(have: dict[str, dict], asked: dict[str, dict], holder: str) -> None:
    """Every module of `asked` must have exactly those knob values in `have` (`holder` names whose they are)."""
    for name in sorted(asked):
        for knob, value in asked[name].items():
            got = have.get(name, {}).get(knob)
            if got != value:
                raise ValueError(f"{name}: {holder} has {knob}={got}, the config asks {knob}={value}")


def read_saved(path: str | Path, method: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json contents, tensors) of a saved adapter, after checking format, version and method."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no {CONFIG_FILE}")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this build reads "
            f"{FORMAT!r} version {VERSION}"
        )
    if meta.get("method") != method:
        raise ValueError(f"{path} holds a {meta.get('method')!r} adapter, not {method!r}")
    return meta, load_file(str(path / WEIGHTS_FILE))


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter tensors into an attached model; every saved and every expected tensor must match."""
    current = adapter_state(model)
    if set(current) != set(tensors):
        raise ValueError(
            f"saved adapter tensors do not match the model: missing "
            f"{sorted(set(current) - set(tensors))[:3]}, unexpected {sorted(set(tensors) - set(current))[:3]}"
        )
    live = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, value in tensors.items():
            if live[name].shape != value.shape:
                raise ValueError(f"{name}: saved shape {tuple(value.shape)}, model has {tuple(live[name].shape)}")
            live[name].copy_(value.to(live[name].device, live[name].dtype))


# ---------------------------------------------------------------------------------------------------------------
# Pooling and repetition, the building blocks of the group-aware adapters
# ---------------------------------------------------------------------------------------------------------------


def avg_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over consecutive groups of `size` features of the last dimension: (..., n) -> (..., n / size)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size).mean(-1)


def repeat(y: torch.Tensor, times: int) -> torch.Tensor:
    """Each feature repeated `times` times in place (repeat-interleave): (..., n) -> (..., n * times)."""
    return y.repeat_interleave(times, dim=-1)


def check_divides(knob: str, value: int, shapes: dict[str, tuple[int, int]], sides: str = "in,out") -> None:
    """`value` must divide in_features (and/or out_features) of every target; the error names layer and sizes."""
    if value <= 0:
        raise ConfigError(f"{knob}={value} must be > 0")
    for name, (in_f, out_f) in shapes.items():
        for side, size in (("in", in_f), ("out", out_f)):
            if side in sides.split(",") and size % value:
                raise ConfigError(
                    f"{knob}={value} does not divide {side}_features={size} of {name} ({in_f} -> {out_f})"
                )


# ---------------------------------------------------------------------------------------------------------------
# Exact merge into group-wise zero points
# ---------------------------------------------------------------------------------------------------------------


def _zero_points(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    return quant.capability(quant.owner(base), "zero_points")(base)


def group_size_of(base: nn.Module) -> int | None:
    """The input-group size of a base layer with group-wise zero points (its quantizer's `zero_points`), or None."""
    found = _zero_points(base)
    return None if found is None else found[2]


@torch.no_grad()
def merge_group_constant(base: nn.Module, delta: torch.Tensor) -> nn.Module:
    """Fold dW (out, in / group_size), constant within each quantization group, into the base's zero points.

    The zero points are kept in their stored dtype: exact in fp32, rounded to that dtype's precision in 16 bits."""
    found = _zero_points(base)
    if found is None:
        raise MergeUnsupported(
            f"no exact zero-point merge for {type(base).__name__}: it has no plain zero point per group of inputs"
        )
    zeros, scales, group_size = found
    groups = (base.out_features, base.in_features // group_size)
    if tuple(delta.shape) != groups or zeros.numel() != delta.numel() or scales.numel() != delta.numel():
        raise ValueError(
            f"delta {tuple(delta.shape)} does not match the {groups} quantization groups "
            f"(zero points {tuple(zeros.shape)}, scales {tuple(scales.shape)})"
        )
    shifted = (zeros.float() - delta.float().to(zeros.device).reshape(zeros.shape) / scales.float()).to(zeros.dtype)
    quant.capability(quant.owner(base), "set_zero_points")(base, shifted)
    return base


# ---------------------------------------------------------------------------------------------------------------
# Merge into a dequantized base (any quantizer): the merged layer is a plain nn.Linear in 16 or 32 bits
# ---------------------------------------------------------------------------------------------------------------


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The (out, in) weight a base layer computes with, whatever its quantizer (the one that owns the layer)."""
    qmod = quant.owner(base)
    if qmod is None:
        raise MergeUnsupported(f"no dequantization for a {type(base).__name__} base")
    return qmod.dequantize(base).reshape(base.out_features, base.in_features)


@torch.no_grad()
def merge_dense(base: nn.Module, delta_weight: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Linear:
    """nn.Linear holding dequantize(base) + delta_weight (and the base's bias), in `dtype` (default fp32)."""
    if quant.capability(quant.owner(base), "QUANTIZES_ACTIVATIONS"):  # smoothquant, int8: Q(x) != dequantize(W) x
        raise MergeUnsupported(
            f"{type(base).__name__} rounds its activations to int8: a dense merge would compute "
            "another function; keep the adapter unmerged"
        )
    weight = dense_weight(base).float()
    weight = weight + delta_weight.float().to(weight.device)
    bias = getattr(base, "bias", None)
    merged = nn.Linear(
        base.in_features, base.out_features, bias=bias is not None, device=weight.device, dtype=dtype or torch.float32
    )
    merged.weight.copy_(weight)
    if bias is not None:
        merged.bias.copy_(bias.float())
    merged.requires_grad_(False)
    return merged


# ---------------------------------------------------------------------------------------------------------------
# Pieces shared by the adapter layers
# ---------------------------------------------------------------------------------------------------------------


def check_common(where: str, dropout: float, adapter_dtype: str) -> None:
    """The knobs every pooled adapter shares (also used by qahira)."""
    if not 0 <= dropout < 1:
        raise ConfigError(f"{where}.dropout={dropout} must lie in [0, 1)")
    if adapter_dtype not in DTYPES:
        raise ConfigError(f"{where}.adapter_dtype={adapter_dtype!r}; choose one of {', '.join(DTYPES)}")


def device_of(layer: nn.Module) -> torch.device:
    """Where a base layer's tensors live (the meta device in plan mode), whatever its quantizer."""
    for t in layer.parameters():
        return t.device
    for t in layer.buffers():
        return t.device
    return torch.device(getattr(layer, "device", "cpu"))


def dropout_layer(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def pooled_delta_weight(core: torch.Tensor, in_pool: int, out_repeat: int, scale: float) -> torch.Tensor:
    """The (out, in) fp32 weight of x -> scale * repeat_out(core @ pool_in(x)): each entry of core spreads over an
    out_repeat x in_pool block, divided by in_pool because pooling averages."""
    dense = core.float().repeat_interleave(out_repeat, dim=0).repeat_interleave(in_pool, dim=1)
    return dense * (scale / in_pool)


@torch.no_grad()
def merge_pooled(layer: nn.Module, delta_weight: torch.Tensor, in_pool: int) -> nn.Module:
    """Fold delta_weight, constant over runs of in_pool inputs, into the base: exactly into its zero points where
    every quantization group lies inside one run, else into a dequantized nn.Linear."""
    group = group_size_of(layer)
    if group is not None and in_pool % group == 0:
        return merge_group_constant(layer, delta_weight[:, ::group])
    return merge_dense(layer, delta_weight, dtype=dense_weight(layer).dtype)


def check_saved(meta: dict, targets: list[str], config: dict, knobs: dict[str, dict] | None = None) -> None:
    """A saved adapter must have been trained with the same knobs on the same modules; `knobs`: the per-layer knob
    values asked for each target ({module: {knob: value}}, module_knobs), compared with the saved "per_module"."""
    if meta["config"] != config:
        diff = {k: (meta["config"].get(k), v) for k, v in config.items() if meta["config"].get(k) != v}
        raise ValueError(f"saved adapter was trained with other knobs (saved, asked): {diff}")
    if meta["targets"] != sorted(targets):
        missing, extra = sorted(set(targets) - set(meta["targets"])), sorted(set(meta["targets"]) - set(targets))
        raise ValueError(f"saved adapter covers other modules: not saved {missing[:3]}, not asked {extra[:3]}")
    if knobs:
        sparse = meta.get("per_module", {})
        saved = {t: {k: sparse.get(t, {}).get(k, meta["config"][k]) for k in asked} for t, asked in knobs.items()}
        check_knobs(saved, knobs, "the saved adapter")
