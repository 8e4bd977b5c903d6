"""LoRA and its variants through peft, on every target linear (quantized or not).

    LoRA    y = W x + s · B(A x),  s = alpha / r
    rsLoRA  the same with s = alpha / sqrt(r)                               (use_rslora)
    DoRA    y = m ⊙ (W + s B A) x / ||W + s B A||_row                        (use_dora; m one per output)
    LoftQ   A, B (and, after more than one iteration, the quantized base) initialised by alternating
            Q = quant(W - B A) and a rank-r SVD of W - Q                    (loftq: {bits, iters})

peft wraps bitsandbytes, HQQ and nn.Linear bases itself (PEFT_WRAPS); our own formats go through
peft's custom-module mapping with a small layer class whose DoRA reads the dequantized weight (peft's DoRA reads
`base.weight`, which packed formats do not have).

LoftQ, our own implementation (peft's `loftq_init` assumes CUDA and quantizes an unquantized model itself, while
our recipe quantizes first and attaches afterwards):
- the original weights W are read from the checkpoint the model was loaded from (`model.name_or_path`), since
  the loaded model only holds Q(W) by the time adapters are attached;
- Q is the base layer's own format (bitsandbytes 4-bit with the base's quant type, block size and double
  quantization), so the alternation optimises exactly the base the model computes with. With iters=1 that base
  is the recipe's Q(W) and stays untouched; with more iterations the target bases are re-quantized from
  W - B'A' (B'A' the factors of the previous iteration), as LoftQ prescribes;
- the forward scale is handled by rescaling: A = R / sqrt(s), B = L / sqrt(s) with L R the rank-r SVD of W - Q, so
  s B A = L R for any alpha, with or without rsLoRA (DoRA's magnitude is then re-initialised from W + s B A);
- the factors (and the shift B'A' the base was quantized from) are cached on disk per (original weights,
  quantization settings, bits, r, iters), under $QPEFT_CACHE/loftq or ~/.cache/qpeft-bench/loftq, so a sweep
  computes each once; the initialisation time the recipe records includes reading the weights and the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qpeft_bench import quant
from qpeft_bench.adapters import base
from qpeft_bench.config import DTYPES, ConfigError, positive
from qpeft_bench.models import DTYPE

log = logging.getLogger("qpeft_bench")

ADAPTER = "default"  # peft's name of the one adapter we attach
FSDP_SHARDABLE = True  # peft's layers: the adapters are modules of their own, which FSDP wraps as units
LOFTQ_DEFAULTS = {"bits": 4, "iters": 1}
LOFTQ_QUANTIZERS = ("nf4", "fp4")  # bitsandbytes 4-bit: the format LoftQ re-quantizes
LOFTQ_FILE = "loftq_base.json"  # beside peft's files: how the base was re-quantized (shift factors inside)
LOFTQ_SHIFT_FILE = "loftq_shift.safetensors"
CACHE_VERSION = (
    3  # 2: randomized SVD for large residuals; key from the checkpoint files' identity. 3: 12 power iterations
)


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
            self.loftq = loftq_settings(self.loftq, f"{where}.loftq")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def loftq_settings(given: dict, where: str) -> dict:
    """The LoftQ knobs with defaults filled in; unknown keys, wrong types and values we cannot run are errors."""
    unknown = sorted(set(given) - set(LOFTQ_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; valid: bits, iters")
    settings = {**LOFTQ_DEFAULTS, **given}
    for key, value in settings.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}.{key}={value!r} has the wrong type: expected int")
    if settings["bits"] != 4:
        raise ConfigError(
            f"{where}.bits={settings['bits']}: only 4 is supported (LoftQ re-quantizes the "
            "bitsandbytes 4-bit base of quant=nf4|fp4)"
        )
    if settings["iters"] < 1:
        raise ConfigError(f"{where}.iters={settings['iters']} must be >= 1")
    return settings


def check_against_arch(cfg: Config, shapes: dict[str, tuple[int, int]]) -> None:
    # A rank above min(in, out) adds parameters without adding expressiveness: almost always a typo.
    for name, (in_f, out_f) in shapes.items():
        if cfg.r > min(in_f, out_f):
            raise ConfigError(
                f"peft.r={cfg.r} exceeds min(in, out)={min(in_f, out_f)} of {name} ({in_f} -> {out_f}); lower peft.r"
            )


def unsupported(quant_name: str, qcfg, cfg: Config) -> str | None:
    # Plain LoRA, rsLoRA and DoRA train on every quantizer (tests/test_peft_methods.py checks the gradients).
    if cfg.loftq is not None and quant_name not in LOFTQ_QUANTIZERS:
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
    loftq = None
    if cfg.loftq is not None and not on_meta:  # plan mode counts parameters only
        loftq = loftq_init(model, targets, cfg.r, cfg.loftq["iters"])
    peft_model = _wrap(model, targets, cfg, per_module)
    if loftq is not None:
        _set_loftq_factors(peft_model, loftq["factors"], cfg)
        peft_model.qpeft_loftq = loftq["report"]  # cache hit or miss and time, for the record
        if cfg.loftq["iters"] > 1:  # `save` keeps them: `load` rebuilds the re-quantized base from them
            peft_model.qpeft_loftq_shifts = {
                t: {k: f[k] for k in ("shift_L", "shift_R")} for t, f in loftq["factors"].items()
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
# LoftQ
# ---------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    root = os.environ.get("QPEFT_CACHE")
    return Path(root) / "loftq" if root else Path.home() / ".cache" / "qpeft-bench" / "loftq"


def checkpoint_folder(source: str) -> tuple[Path, dict | None]:
    """The directory of the safetensors checkpoint the model was loaded from (a local directory or a cached hub
    snapshot), and its shard index (None for a single model.safetensors)."""
    folder = Path(source) if source else None
    if folder is None or not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True)) if source else None
        except Exception:
            folder = None
    if folder is None:
        raise FileNotFoundError(
            f"LoftQ needs the unquantized weights, but the model was loaded from {source!r}, "
            "which is no local directory or cached hub snapshot with safetensors files"
        )
    index = folder / "model.safetensors.index.json"
    return folder, json.loads(index.read_text())["weight_map"] if index.is_file() else None


def _locate(folder: Path, files: dict | None, name: str) -> tuple[Path, list[str]]:
    # older checkpoints (OPT's among them) store the decoder without the "model." prefix of the module tree
    keys = [f"{name}.weight", f"{name.removeprefix('model.')}.weight"]
    key = next((k for k in keys if files is not None and k in files), keys[0])
    file = folder / (files[key] if files is not None and key in files else "model.safetensors")
    if not file.is_file():
        raise FileNotFoundError(f"LoftQ: {file} not found (looking for {key})")
    return file, keys


def checkpoint_weights(source: str, names: list[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """`<name>.weight` of each module from the safetensors checkpoint in directory `source` (single file or
    sharded), on `device` in the checkpoint's dtype (read straight to the GPU when the device is one)."""
    from safetensors import safe_open

    folder, files = checkpoint_folder(source)
    out = {}
    for name in names:
        file, keys = _locate(folder, files, name)
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            key = next((k for k in keys if k in f.keys()), None)
            if key is None:
                raise KeyError(f"LoftQ: {keys[0]} is not in {file}")
            out[name] = f.get_tensor(key)
    return out


def checkpoint_fingerprint(source: str, names: list[str]) -> str:
    """Identity of the weights `names` come from, without reading them: each file's path, size, modification time
    and safetensors header (names, dtypes, shapes, offsets). Hashing the 13 GB of a 7B model's weights took longer
    than the LoftQ computation itself."""
    folder, files = checkpoint_folder(source)
    digest = hashlib.sha256()
    for file in sorted({_locate(folder, files, n)[0] for n in names}):
        stat = file.stat()
        with file.open("rb") as f:
            header = f.read(8 + int.from_bytes(f.read(8), "little")) if stat.st_size >= 8 else b""
        digest.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:".encode() + header)
    digest.update(json.dumps(sorted(names)).encode())
    return digest.hexdigest()


def _bnb4_settings(layer: nn.Module) -> dict:
    if quant.owner(layer) not in [quant.get(q) for q in LOFTQ_QUANTIZERS]:
        raise TypeError(f"LoftQ re-quantizes bitsandbytes 4-bit bases; got a {type(layer).__name__}")
    w = layer.weight
    return {"quant_type": w.quant_type, "blocksize": w.blocksize, "double_quant": bool(w.compress_statistics)}


def requantize_like(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new bitsandbytes 4-bit layer holding `weight`, in exactly the format (and compute dtype) of `layer`."""
    settings = _bnb4_settings(layer)
    qmod = quant.get(settings["quant_type"])
    old = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    old.weight = nn.Parameter(weight, requires_grad=False)
    old.bias = layer.bias
    names = {v: k for k, v in DTYPE.items()}
    storage = names.get(layer.weight.quant_storage, "uint8")  # FSDP stores the codes as the model's dtype
    return qmod.quantize_linear(
        old, qmod.Config(**settings, quant_storage=storage), names[layer.compute_dtype], str(weight.device)
    )


# Randomized SVD (Halko et al.): a sketch of 4 x rank columns refined by POWER_ITERS power iterations.
# A full SVD of every residual made LoftQ of LLaMA-2-7B take minutes (peft: 277 s on an H100); the sketch takes
# seconds. LoftQ's residual W - Q is quantization noise, a nearly flat spectrum, where power iterations converge
# slowly: on a 4096 x 4096 NF4 residual the rank-64 error is 1.0003x the exact truncation's after 6 iterations,
# 1.00002x after 12 (scripts/bench_loftq.py compares with peft's exact SVD on the GPU; tests/test_peft_methods.py
# checks the bound on a flat spectrum).
OVERSAMPLE = 3  # sketch columns per rank: q = (1 + OVERSAMPLE) * rank
POWER_ITERS = 12
EXACT_UP_TO = 512  # matrices this small take an exact SVD in milliseconds


def low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L R the best rank-`rank` approximation of `residual` (truncated SVD, singular values split
    evenly between the two factors as LoftQ does). Exact SVD for small matrices, randomized for large ones."""
    a = residual.float()
    q = (1 + OVERSAMPLE) * rank
    if min(a.shape) <= max(2 * q, EXACT_UP_TO):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    else:
        g = torch.Generator(device=a.device).manual_seed(0)  # the same factors for the same residual (cache key)
        u, s, vh = _randomized_svd(a, q, POWER_ITERS, g)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


def _randomized_svd(a: torch.Tensor, q: int, iters: int, generator: torch.Generator):
    """U, S, Vh of rank q approximating a: range finder with re-orthonormalised power iterations, then an exact SVD
    of the small (q x n) projection."""
    basis = _orthonormal(a @ torch.randn(a.shape[1], q, device=a.device, generator=generator))
    for _ in range(iters):
        basis = _orthonormal(a @ _orthonormal(a.T @ basis))
    u, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return basis @ u, s, vh


def _orthonormal(b: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of a tall `b`: Cholesky QR twice (a q x q Gram matrix and a triangular
    solve, GEMM-shaped work, where Householder QR of a tall matrix is a chain of small kernels on a GPU; the second
    pass restores the orthogonality the first loses), Householder QR if the Gram matrix is not positive definite."""
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(b.T @ b)
        if int(info) != 0:
            return torch.linalg.qr(b).Q
        b = torch.linalg.solve_triangular(chol, b.T, upper=False).T  # b R^-1 with R = chol^T
    return b


@torch.no_grad()
def loftq_layer(weight: torch.Tensor, layer: nn.Module, rank: int, iters: int) -> dict[str, torch.Tensor]:
    """LoftQ's alternation for one layer: Q_t = quant(W - L_{t-1} R_{t-1}), L_t R_t = SVD_r(W - Q_t).

    `weight` is the original W (checkpoint dtype, on the layer's device); `layer` the base quantized from W. The
    first Q is that base itself. Returns the final factors L, R (fp32) and, with iters > 1, the factors
    `shift_L`, `shift_R` the final base was quantized from (W - shift_L shift_R)."""
    w = weight.float()
    q = base.dense_weight(layer).float()
    out = {}
    for step in range(iters):
        if step:
            shift = out["L"] @ out["R"]
            out["shift_L"], out["shift_R"] = out["L"], out["R"]
            q = base.dense_weight(requantize_like(layer, (w - shift).to(weight.dtype))).float()
        out["L"], out["R"] = low_rank(w - q, rank)
    return out


def _weights_key(fingerprint: str, settings: dict, rank: int, iters: int, device: str) -> str:
    # The device type is part of the key: LoftQ on the CPU and on CUDA do not agree bit for bit (measured on an
    # H100 with iters=2: most dequantized base values of a layer differed slightly, the updates by < 1e-3).
    digest = hashlib.sha256(
        json.dumps(
            {
                "version": CACHE_VERSION,
                "bits": 4,
                "r": rank,
                "iters": iters,
                "quant": settings,
                "device": device,
                "weights": fingerprint,
            },
            sort_keys=True,
        ).encode()
    )
    return digest.hexdigest()[:40]


def loftq_init(model, targets: list[str], rank: int, iters: int) -> dict:
    """LoftQ factors for every target, from the cache or computed (and cached); with iters > 1 the target bases
    of `model` are replaced by their re-quantization. Returns {"factors": {target: {L, R, ...}}, "report": {...}}."""
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    settings = {t: _bnb4_settings(model.get_submodule(t)) for t in targets}
    first = settings[targets[0]]
    if any(s != first for s in settings.values()):
        raise ValueError("LoftQ: the target layers are quantized with different settings")
    device = model.get_submodule(targets[0]).weight.device
    key = _weights_key(checkpoint_fingerprint(source, targets), first, rank, iters, device.type)
    path = cache_dir() / f"{key}.safetensors"
    if path.is_file():
        flat = load_file(str(path), device=str(device))
        factors = {
            t: {k: flat[f"{t}.{k}"] for k in ("L", "R", "shift_L", "shift_R") if f"{t}.{k}" in flat} for t in targets
        }
        hit = True
    else:
        # one original weight at a time, read straight to the device: never the whole unquantized model at once
        factors = {
            t: loftq_layer(checkpoint_weights(source, [t], device)[t], model.get_submodule(t), rank, iters)
            for t in targets
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(
            {f"{t}.{k}": v.contiguous().cpu() for t, f in factors.items() for k, v in f.items()},
            str(tmp),
            metadata={"r": str(rank), "iters": str(iters), "quant": json.dumps(first)},
        )
        tmp.replace(path)  # atomic: a concurrent sweep job reads either nothing or the whole file
        hit = False
    if iters > 1:
        shift_bases(model, {t: factors[t] for t in targets}, source)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the recipe's timer must see the finished work
    report = {
        "cache": "hit" if hit else "miss",
        "cache_file": str(path),
        "iters": iters,
        "time_s": time.perf_counter() - t0,
        "base_requantized": iters > 1,
    }
    log.info("LoftQ (r=%d, %d iteration(s)): cache %s, %.2f s", rank, iters, report["cache"], report["time_s"])
    return {"factors": factors, "report": report}


def shift_bases(model, shifts: dict[str, dict], source: str) -> None:
    """Replace each target base by the 4-bit quantization of W - shift_L shift_R (LoftQ's final Q), W read from the
    checkpoint `source` one layer at a time."""
    for name, f in shifts.items():
        layer = model.get_submodule(name)
        device = layer.weight.device
        w = checkpoint_weights(source, [name], str(device))[name]
        shifted = (w.float() - f["shift_L"].to(device).float() @ f["shift_R"].to(device).float()).to(w.dtype)
        model.set_submodule(name, requantize_like(layer, shifted))


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
            str(path / LOFTQ_SHIFT_FILE),
        )
    (path / LOFTQ_FILE).write_text(
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
    meta = json.loads((path / LOFTQ_FILE).read_text()) if (path / LOFTQ_FILE).is_file() else {"loftq": None}
    if meta["loftq"] != cfg.loftq:
        raise ValueError(f"{path}: saved with loftq={meta['loftq']}, this config has loftq={cfg.loftq}")
    shifts = None
    if (path / LOFTQ_SHIFT_FILE).is_file():  # the trained base was LoftQ's re-quantization: rebuild it
        flat = load_file(str(path / LOFTQ_SHIFT_FILE))
        shifts = {t: {k: flat[f"{t}.{k}"] for k in ("shift_L", "shift_R")} for t in targets}
        source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        shift_bases(model, shifts, source)
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
