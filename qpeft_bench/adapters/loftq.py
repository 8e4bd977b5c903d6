"""LoftQ initialisation of peft's LoRA (peft.loftq: {bits, iters}; adapters/lora.py attaches with it).

Our own implementation (peft's `loftq_init` assumes CUDA and quantizes an unquantized model itself, while
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

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from qpeft_bench import fingerprint, quant, results
from qpeft_bench.adapters import base
from qpeft_bench.config import ConfigError
from qpeft_bench.models import DTYPE

log = logging.getLogger("qpeft_bench")

LOFTQ_DEFAULTS = {"bits": 4, "iters": 1}
LOFTQ_QUANTIZERS = ("nf4", "fp4")  # bitsandbytes 4-bit: the format LoftQ re-quantizes
LOFTQ_FILE = "loftq_base.json"  # beside peft's files: how the base was re-quantized (shift factors inside)
LOFTQ_SHIFT_FILE = "loftq_shift.safetensors"
# 2: randomized SVD for large residuals; key from the checkpoint files' identity. 3: 12 power iterations. 4: key from
# the weights' content fingerprints and the dtypes the base was quantized and dequantized in
CACHE_VERSION = 4


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
    """Identity of the weights `names` come from: each checkpoint file holding them, by its name in the checkpoint and
    its content fingerprint (fingerprint.py: the run id's, which samples a large file's blocks, its safetensors header
    included, rather than reading 13 GB). Other weights of the same shape at the same path are another key, even with
    the old modification time (cp -p, tar), so a stale initialisation is never reused; the same weights at another
    path share one."""
    folder, files = checkpoint_folder(source)
    digest = hashlib.sha256()
    for file in sorted({_locate(folder, files, n)[0] for n in names}):
        digest.update(f"{file.relative_to(folder)}:{fingerprint.fingerprint(file)}:".encode())
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


def _weights_key(weights: str, settings: dict, dtypes: dict, rank: int, iters: int, device: str) -> str:
    # The device type is part of the key: LoftQ on the CPU and on CUDA do not agree bit for bit (measured on an
    # H100 with iters=2: most dequantized base values of a layer differed slightly, the updates by < 1e-3). So are
    # the dtypes: the base was quantized from the weights cast to the model's dtype and dequantizes in its compute
    # dtype, and the residual W - Q follows both.
    digest = hashlib.sha256(
        json.dumps(
            {
                "version": CACHE_VERSION,
                "bits": 4,
                "r": rank,
                "iters": iters,
                "quant": settings,
                "dtypes": dtypes,
                "device": device,
                "weights": weights,
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
    layer = model.get_submodule(targets[0])
    device = layer.weight.device
    dtypes = {"model": str(getattr(model, "dtype", None)), "compute": str(getattr(layer, "compute_dtype", None))}
    key = _weights_key(checkpoint_fingerprint(source, targets), first, dtypes, rank, iters, device.type)
    path = cache_dir() / f"{key}.safetensors"
    factors = _cached_factors(path, targets, str(device), load_file)
    hit = factors is not None
    if factors is None:
        # one original weight at a time, read straight to the device: never the whole unquantized model at once
        factors = {
            t: loftq_layer(checkpoint_weights(source, [t], device)[t], model.get_submodule(t), rank, iters)
            for t in targets
        }
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(
                {f"{t}.{k}": v.contiguous().cpu() for t, f in factors.items() for k, v in f.items()},
                str(tmp),
                metadata={"r": str(rank), "iters": str(iters), "quant": json.dumps(first)},
            )
            results.follow_umask(tmp)  # safetensors writes 0600; the cache is as readable as the user's other files
            tmp.replace(path)  # atomic: a concurrent sweep job reads either nothing or the whole file
        except OSError as err:  # a read-only $QPEFT_CACHE or $HOME, a full disk: the factors are computed anyway
            with contextlib.suppress(OSError):  # under a file the temporary was never made
                tmp.unlink()
            log.warning("LoftQ cache not written (%s: %s); the run goes on without it", path, err)
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


def _cached_factors(path: Path, targets: list[str], device: str, load_file) -> dict | None:
    """The cached factors of every target, or None: absent, or a file that cannot be read or lacks a target's L and
    R (torn, edited, from another version) is computed again, with a warning, never half trusted."""
    if not path.is_file():
        return None
    try:
        flat = load_file(str(path), device=device)
    except Exception as err:  # safetensors raises its own SafetensorError on a torn header
        log.warning("LoftQ cache entry %s is unreadable (%s); computing it again", path, err)
        return None
    keys = ("L", "R", "shift_L", "shift_R")
    factors = {t: {k: flat[f"{t}.{k}"] for k in keys if f"{t}.{k}" in flat} for t in targets}
    bad = [
        t
        for t, f in factors.items()
        if not {"L", "R"} <= set(f) or not all(torch.isfinite(v).all() for v in f.values())
    ]
    if bad:
        log.warning("LoftQ cache entry %s lacks or holds non-finite factors of %s; computing it again", path, bad[0])
        return None
    return factors


def shift_bases(model, shifts: dict[str, dict], source: str) -> None:
    """Replace each target base by the 4-bit quantization of W - shift_L shift_R (LoftQ's final Q), W read from the
    checkpoint `source` one layer at a time."""
    for name, f in shifts.items():
        layer = model.get_submodule(name)
        device = layer.weight.device
        w = checkpoint_weights(source, [name], str(device))[name]
        shifted = (w.float() - f["shift_L"].to(device).float() @ f["shift_R"].to(device).float()).to(w.dtype)
        model.set_submodule(name, requantize_like(layer, shifted))
