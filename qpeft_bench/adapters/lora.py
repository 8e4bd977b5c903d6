"""LoRA and its variants through peft, on every target linear (quantized or not).

    LoRA    y = W x + s · B(A x),  s = alpha / r
    rsLoRA  the same with s = alpha / sqrt(r)                               (use_rslora)
    DoRA    y = m ⊙ (W + s B A) x / ||W + s B A||_row                        (use_dora; m one per output)
    LoftQ   A, B (and, after more than one iteration, the quantized base) initialised by alternating
            Q = quant(W - B A) and a rank-r SVD of W - Q                    (loftq: {bits, iters})

peft wraps bitsandbytes, HQQ and nn.Linear bases itself (PEFT_WRAPS); our own formats go through
peft's custom-module mapping with a small layer class whose DoRA reads the dequantized weight (peft's DoRA reads
`base.weight`, which packed formats do not have).

LoftQ's initialisation itself (checkpoint reading, the alternation, its cache) is adapters/loftq.py; here its
factors become the adapter's A and B.

"""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qpeft_bench import quant
from qpeft_bench.adapters import base, loftq
from qpeft_bench.config import DTYPES, ConfigError, positive
from qpeft_bench.models import DTYPE

log = logging.getLogger("qpeft_bench")

ADAPTER = "default"  # peft's name of the one adapter we attach
FSDP_SHARDABLE = True  # peft's layers: the adapters are modules of their own, which FSDP wraps as units
FUSED_LORA = True  # peft's LoRA/DoRA layers, whose forward fused_lora.py replaces


@dataclass
class Config:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    # dtype of the adapter weights. bfloat16 is what qlora.py trains in and what the published overhead
    # tables count; float32 trades memory for update precision.
    adapter_dtype: str = "bfloat16"
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA)
    use_dora: bool = False  # weight-decomposed LoRA: a trainable magnitude per output feature
    loftq: dict | None = None  # {bits: 4, iters: 1}: LoftQ initialisation; null: the usual (A random, B = 0)

    def check(self, where: str) -> None:
        positive(where, "r", self.r)
        positive(where, "alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout={self.dropout} must lie in [0, 1)")
        if self.adapter_dtype not in DTYPES:
            raise ConfigError(f"{where}.adapter_dtype={self.adapter_dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.loftq is not None:
            self.loftq = loftq.loftq_settings(self.loftq, f"{where}.loftq")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    # A rank above min(in, out) adds parameters without adding expressiveness: almost always a typo.
    for name, (in_f, out_f) in shapes.items():
        if cfg.r > min(in_f, out_f):
            raise ConfigError(
                f"peft.r={cfg.r} exceeds min(in, out)={min(in_f, out_f)} of {name} ({in_f} -> {out_f}); lower peft.r"
            )


def unsupported(quant_name: str, qcfg, cfg: Config) -> str | None:
    # Plain LoRA, rsLoRA and DoRA train on every quantizer (tests/test_peft_methods.py checks the gradients).
    if cfg.loftq is not None and quant_name not in loftq.LOFTQ_QUANTIZERS:
        return (
            "LoftQ initialises from the error of the bitsandbytes 4-bit quantization it re-quantizes; "
            "use quant=nf4 or quant=fp4"
        )
    return None


# ---------------------------------------------------------------------------------------------------------------
# Attach, verify
# ---------------------------------------------------------------------------------------------------------------


PER_LAYER_KNOBS = ("r", "alpha")  # settable per layer group (peft.by_layer; qpeft_bench/layers.py)


def attach(model, targets: list[str], cfg: Config, per_module: dict[str, Config] | None = None):
    """`per_module`: {module: Config} with per-layer-group r/alpha (peft's rank_pattern/alpha_pattern)."""
    on_meta = any(p.is_meta for t in targets for p in model.get_submodule(t).parameters())
    if per_module and cfg.loftq is not None:
        raise ConfigError("peft.by_layer with LoftQ is not implemented: LoftQ initialises one rank for all layers")
    init = None
    if cfg.loftq is not None and not on_meta:  # plan mode counts parameters only
        init = loftq.loftq_init(model, targets, cfg.r, cfg.loftq["iters"])
    peft_model = _wrap(model, targets, cfg, per_module)
    if init is not None:
        _set_loftq_factors(peft_model, init["factors"], cfg)
        peft_model.qpeft_loftq = init["report"]  # cache hit or miss and time, for the record
        if cfg.loftq["iters"] > 1:  # `save` keeps them: `load` rebuilds the re-quantized base from them
            peft_model.qpeft_loftq_shifts = {
                t: {k: f[k] for k in ("shift_L", "shift_R")} for t, f in init["factors"].items()
            }
    verify(peft_model, targets, cfg, per_module)
    return peft_model


def _wrap(model, targets: list[str], cfg: Config, per_module: dict[str, Config] | None = None):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        target_modules=targets,  # full module names: peft matches them exactly
        # per-module values as full names; verify() checks that peft applied each of them
        **_patterns(cfg, per_module),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # our own quantized layers compute y = W x like nn.Linear; peft's LoRA wrapper needs to be told so (the layers of
    # every quantizer peft does not wrap itself, PEFT_WRAPS)
    custom = {
        cls: quant_lora_linear()
        for qmod in quant.modules()
        if not quant.capability(qmod, "PEFT_WRAPS")
        for cls in qmod.layer_classes()
    }
    if cfg.use_dora:
        # peft's DoRA on LLM.int8 layers re-creates the weight parameter on the CPU to dequantize it, which loses
        # bitsandbytes' row scales after an eval-mode forward (the next training forward fails); ours reads them.
        custom.update({cls: quant_lora_linear() for cls in quant.get("int8").layer_classes()})
    config._register_custom_module(custom)
    with warnings.catch_warnings():
        # "Unsupported layer type ... proceed at your own risk": our registered layers; the gradient tests vouch
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        # autocast_adapter_dtype=False: peft would otherwise upcast bf16 adapters to fp32 behind our back.
        model = get_peft_model(model, config, autocast_adapter_dtype=False)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(DTYPE[cfg.adapter_dtype])
    return model


def _patterns(cfg: Config, per_module: dict[str, Config] | None) -> dict[str, dict]:
    """peft's rank_pattern and alpha_pattern: the modules whose r or alpha differs from cfg's, by full name."""
    return {
        "rank_pattern": {n: c.r for n, c in (per_module or {}).items() if c.r != cfg.r},
        "alpha_pattern": {n: c.alpha for n, c in (per_module or {}).items() if c.alpha != cfg.alpha},
    }


def tuner_layers(model, cls: type) -> dict:
    """{target module name in the plain model: peft layer of class `cls`} (peft-backed methods share this)."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, cls)}


def lora_layers(model) -> dict:
    from peft.tuners.lora import LoraLayer

    return tuner_layers(model, LoraLayer)


def verify(model, targets: list[str], cfg: Config, per_module: dict[str, Config] | None = None) -> None:
    """Every target, and nothing else, carries an adapter of rank r with the scale asked for (alpha/r, or
    alpha/sqrt(r) with rsLoRA) and, exactly where DoRA is asked for, a magnitude per output feature; peft does not
    check this for us."""
    layers = lora_layers(model)
    missing, extra = sorted(set(targets) - set(layers)), sorted(set(layers) - set(targets))
    if missing or extra:
        raise RuntimeError(
            f"LoRA on the wrong modules: missing {missing[:3]} ({len(missing)}), unexpected {extra[:3]} ({len(extra)})"
        )
    dtype = DTYPE[cfg.adapter_dtype]
    default = cfg
    for name in targets:
        cfg = (per_module or {}).get(name, default)
        layer = layers[name]
        r, scale = layer.r[ADAPTER], layer.scaling[ADAPTER]
        if r != cfg.r or not math.isclose(scale, cfg.scale, rel_tol=1e-12):
            raise RuntimeError(
                f"{name}: got r={r}, scale={scale}; asked r={cfg.r}, scale={cfg.scale} "
                f"({'alpha/sqrt(r)' if cfg.use_rslora else 'alpha/r'})"
            )
        magnitude = layer.lora_magnitude_vector[ADAPTER].weight if ADAPTER in layer.lora_magnitude_vector else None
        if cfg.use_dora != (magnitude is not None):
            raise RuntimeError(
                f"{name}: DoRA magnitude {'present' if magnitude is not None else 'missing'}; "
                f"asked use_dora={cfg.use_dora}"
            )
        if magnitude is not None and tuple(magnitude.shape) != (layer.out_features,):
            raise RuntimeError(
                f"{name}: DoRA magnitude of shape {tuple(magnitude.shape)}, expected ({layer.out_features},)"
            )
        params = [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
        params += [magnitude] if magnitude is not None else []
        if any(p.dtype != dtype or not p.requires_grad for p in params):
            raise RuntimeError(
                f"{name}: adapter tensors {[(p.dtype, p.requires_grad) for p in params]}; asked "
                f"trainable {cfg.adapter_dtype}"
            )


# ---------------------------------------------------------------------------------------------------------------
# peft's LoRA layer for our QuantLinear formats, with a DoRA that reads the dequantized weight
# ---------------------------------------------------------------------------------------------------------------


class _DenseView:
    """What peft's DoRA reads from a base layer (weight, bias, parameters), for a layer that stores its weight
    packed. A plain tensor as `weight` is returned by peft's dequantize_module_weight as it is."""

    def __init__(self, layer: nn.Module):
        self.weight = base.dense_weight(layer)
        self.bias = layer.bias
        self.parameters = layer.parameters


@functools.cache
def quant_lora_linear() -> type:
    """The peft LoRA layer class registered for QuantLinear (and, with DoRA, LLM.int8 layers); built on first use
    because peft is imported lazily."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.layer import Linear
    from peft.tuners.lora.variants import DoraLinearVariant

    class QuantDoraLayer(DoraLinearLayer):
        def update_layer(self, *, base_layer, **kwargs) -> None:
            super().update_layer(base_layer=_DenseView(base_layer), **kwargs)

        def forward(self, x, *, base_layer, **kwargs):
            return super().forward(x, base_layer=_DenseView(base_layer), **kwargs)

    class QuantDoraVariant(DoraLinearVariant):
        @staticmethod
        def init(module, adapter_name: str, **kwargs) -> None:
            if not module.lora_magnitude_vector:  # makes the magnitude a trainable, saved adapter tensor
                module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
            layer = QuantDoraLayer(fan_in_fan_out=False)
            layer.update_layer(
                base_layer=module.get_base_layer(),
                lora_A=module.lora_A[adapter_name].weight,
                lora_B=module.lora_B[adapter_name].weight,
                scaling=module.scaling[adapter_name],
            )
            module.lora_magnitude_vector[adapter_name] = layer

    class QuantLoraLinear(Linear):
        @property
        def lora_variants(self):
            return {(): None, ("use_dora",): QuantDoraVariant}

    return QuantLoraLinear


# ---------------------------------------------------------------------------------------------------------------
# LoftQ's factors into peft's layers (the initialisation: loftq.py)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _set_loftq_factors(peft_model, factors: dict[str, dict], cfg: Config) -> None:
    """A = R / sqrt(s), B = L / sqrt(s): the adapter adds s B A = L R whatever the forward scale s."""
    dtype = DTYPE[cfg.adapter_dtype]
    for name, layer in lora_layers(peft_model).items():
        root = math.sqrt(layer.scaling[ADAPTER])
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        a.copy_((factors[name]["R"] / root).to(a.device, dtype))
        b.copy_((factors[name]["L"] / root).to(b.device, dtype))
        if ADAPTER in layer.lora_magnitude_vector:  # DoRA: m = ||W + s B A||, so the first forward is W + s B A
            m = layer.lora_magnitude_vector[ADAPTER].weight
            w = base.dense_weight(layer.get_base_layer()).float()
            delta = layer.scaling[ADAPTER] * (b.float() @ a.float())
            m.copy_(torch.linalg.norm(w + delta.to(w.device), dim=1).to(m.device, m.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Save, load, merge
# ---------------------------------------------------------------------------------------------------------------


def save(model, path, cfg: Config, per_module: dict[str, Config] | None = None) -> None:
    """peft's own format (adapter_config.json + adapter_model.safetensors; per-group r/alpha in its rank_pattern and
    alpha_pattern); with LoftQ after more than one iteration also the shift factors the base was re-quantized from,
    so that `load` rebuilds that base. `per_module`, if given, must be what the model carries (verify)."""
    from safetensors.torch import save_file

    if per_module is not None:
        verify(model, sorted(lora_layers(model)), cfg, per_module)
    path = Path(path)
    model.save_pretrained(str(path))
    if cfg.loftq is None:
        return
    shifts = getattr(model, "qpeft_loftq_shifts", None)
    if cfg.loftq["iters"] > 1:
        if shifts is None:
            raise RuntimeError("LoftQ with iters > 1 re-quantized the base, but the shift factors are gone")
        save_file(
            {f"{t}.{k}": v.contiguous().cpu() for t, f in shifts.items() for k, v in f.items()},
            str(path / loftq.LOFTQ_SHIFT_FILE),
        )
    (path / loftq.LOFTQ_FILE).write_text(
        json.dumps({"loftq": cfg.loftq, "base_requantized": shifts is not None}, indent=2, sort_keys=True) + "\n"
    )


def load(model, targets: list[str], cfg: Config, path, per_module: dict[str, Config] | None = None):
    """The saved adapters on a freshly quantized base (the one the recipe builds before attaching), with the
    per-module r/alpha of `per_module`; refuses (ValueError) a saved adapter with other knobs, per module too."""
    from safetensors.torch import load_file

    path = Path(path)
    saved = json.loads((path / "adapter_config.json").read_text())
    want = {"r": cfg.r, "lora_alpha": cfg.alpha, "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora}
    got = {k: saved.get(k) for k in want}
    modules = _saved_modules(path)
    if got != want or modules != sorted(targets):
        raise ValueError(
            f"{path}: saved adapter has {got} on {len(modules)} modules; this config asks {want} on {len(targets)}"
        )
    ranks, alphas = saved.get("rank_pattern") or {}, saved.get("alpha_pattern") or {}
    saved_knobs = {t: {"r": ranks.get(t, saved["r"]), "alpha": alphas.get(t, saved["lora_alpha"])} for t in targets}
    base.check_knobs(saved_knobs, base.module_knobs(cfg, per_module, targets, PER_LAYER_KNOBS), "the saved adapter")
    meta = json.loads((path / loftq.LOFTQ_FILE).read_text()) if (path / loftq.LOFTQ_FILE).is_file() else {"loftq": None}
    if meta["loftq"] != cfg.loftq:
        raise ValueError(f"{path}: saved with loftq={meta['loftq']}, this config has loftq={cfg.loftq}")
    shifts = None
    if (path / loftq.LOFTQ_SHIFT_FILE).is_file():  # the trained base was LoftQ's re-quantization: rebuild it
        flat = load_file(str(path / loftq.LOFTQ_SHIFT_FILE))
        shifts = {t: {k: flat[f"{t}.{k}"] for k in ("shift_L", "shift_R")} for t in targets}
        source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        loftq.shift_bases(model, shifts, source)
    peft_model = _wrap(model, targets, cfg, per_module)
    load_peft_state(peft_model, path, "lora_")
    if shifts is not None:
        peft_model.qpeft_loftq_shifts = shifts
    verify(peft_model, targets, cfg, per_module)
    return peft_model


def _saved_modules(path: Path) -> list[str]:
    """The modules a saved peft LoRA adapter holds tensors for, by full name. Not its target_modules: with 20 or more
    targets peft condenses those to name suffixes (e.g. ["q_proj", ...]) before saving."""
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    return sorted({k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys})


def merge(model):
    """The plain transformers model with each LoRA/DoRA layer replaced by an nn.Linear holding
    dequantize(W) + the update, in the model's dtype (exact in fp32). Bases that also quantize activations
    (LLM.int8, SmoothQuant W8A8) have no such merge."""
    return merge_layers(model, lora_layers(model), _merged)


def load_peft_state(peft_model, path: Path, prefix: str) -> None:
    """peft's saved adapter tensors into an attached model; every saved and every adapter tensor must match."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(peft_model, load_file(str(Path(path) / "adapter_model.safetensors")))
    expected = {k for k in peft_model.state_dict() if prefix in k}
    missing = sorted(k for k in result.missing_keys if k in expected)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: adapter tensors do not match the model: missing {missing[:3]}, unexpected "
            f"{list(result.unexpected_keys)[:3]}"
        )


def merge_layers(model, layers: dict, merged) -> nn.Module:
    """The plain model with each peft layer replaced by merged(name, layer, dtype), dtype the model's."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = inner.get_input_embeddings().weight.dtype
    for name, layer in layers.items():
        inner.set_submodule(name, merged(name, layer, dtype))
    return inner


@torch.no_grad()
def _merged(name: str, layer, dtype: torch.dtype) -> nn.Linear:
    base_layer = layer.get_base_layer()
    a, b = layer.lora_A[ADAPTER].weight.float(), layer.lora_B[ADAPTER].weight.float()
    delta = layer.scaling[ADAPTER] * (b @ a)
    if ADAPTER in layer.lora_magnitude_vector:  # DoRA: W' = m ⊙ (W + s B A) / ||W + s B A||_row
        w = base.dense_weight(base_layer).float()
        updated = w + delta.to(w.device)
        m = layer.lora_magnitude_vector[ADAPTER].weight.float().to(w.device)
        delta = (m / torch.linalg.norm(updated, dim=1)).unsqueeze(1) * updated - w
    return base.merge_dense(base_layer, delta, dtype)
