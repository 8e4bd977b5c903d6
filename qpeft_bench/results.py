"""The run record (DESIGN §5): schema, stable run id, atomic writes, run metadata."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

SCHEMA = "qpeft-bench/run-record/v1"
STATUSES = ("planned", "running", "completed", "failed", "oom", "diverged")
RECORD = "result.json"

# Keys that say where or how a run is launched, not what it computes: they stay out of the run id so that
# moving the output directory or re-launching with overwrite=true finds the same run.
NON_IDENTITY_KEYS = ("hydra", "output_root", "overwrite", "run_dir", "logger", "wandb")
# ...and nested keys of the same kind: adding checkpoints to a re-submitted run must find the run it resumes
NON_IDENTITY_PATHS = (("train", "checkpoint_every"),)


def run_id(config: dict) -> str:
    """Stable 12-hex-digit hash of the resolved config without output/launcher keys.

    Normalised so that equal configs hash equally: keys sorted, 16 and 16.0 the same number, shipped assets
    named by their path inside the package plus a fingerprint of their content (the checkout's location
    does not matter, a rebuilt tiny model does), and `train.device=auto` replaced by the device it means
    here (a run measured on the CPU is not the same run on a GPU).
    """
    identity = _normalise({k: v for k, v in config.items() if k not in NON_IDENTITY_KEYS})
    for section, key in NON_IDENTITY_PATHS:
        if isinstance(identity.get(section), dict):
            identity[section].pop(key, None)
    train = identity.get("train")
    if identity.get("mode") == "train" and isinstance(train, dict) and train.get("device") == "auto":
        import torch

        train["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _normalise(value):
    from qpeft_bench import ASSETS

    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.startswith(str(ASSETS)):
        return f"<assets>{value[len(str(ASSETS)):]}@{_fingerprint(Path(value))}"
    return value


def _fingerprint(path: Path) -> str:
    """Content hash of a shipped asset (file or directory); assets are small, so this takes milliseconds."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.exists():
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:8]


def code_fingerprint() -> str:
    """Content hash of this package's source (not its assets): cached results are only reused by the same code."""
    digest = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for file in sorted(pkg.rglob("*.py")):
        digest.update(str(file.relative_to(pkg)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def _json_safe(value):
    """NaN and infinities become strings: bare NaN is not JSON, and strict readers reject the record."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_json(path: Path, data: dict) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: readers see the old or the new
    record, never a truncated one, even if the process is killed mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_json_safe(data), f, indent=2, sort_keys=False, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(run_dir: Path) -> dict | None:
    """The record in `run_dir`, or None if there is none or it cannot be parsed."""
    try:
        data = json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip() != ""
        return {"git_commit": commit, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


PACKAGES = ("qpeft-bench", "torch", "transformers", "peft", "bitsandbytes", "hqq", "hydra-core", "omegaconf",
            "datasets", "lm-eval", "accelerate", "tokenizers")


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_meta(device: str | None) -> dict:
    import torch

    dev = device
    if device and device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "packages": package_versions(),
        "python": platform.python_version(),
        **_git_state(),
        "device": dev,
        "host": socket.gethostname(),
        "cpu_threads": torch.get_num_threads(),
        "start_time": now(),
        "end_time": None,
    }


def new_record(rid: str, config: dict, status: str, meta: dict) -> dict:
    assert status in STATUSES
    return {
        "schema": SCHEMA,
        "run_id": rid,
        "status": status,
        "config": {k: v for k, v in config.items() if k != "hydra"},
        "accounting": {},
        "train": {},
        "eval": {},
        "meta": meta,
    }
