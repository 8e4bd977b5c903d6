"""The run record (docs/design.md §5): schema, stable run id, atomic writes, run metadata; the lock that keeps two
processes off one run, and the redaction that keeps credentials out of everything written."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import platform
import re
import resource
import socket
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from qpeft_bench import fingerprint

SCHEMA = "qpeft-bench/run-record/v1"
STATUSES = ("planned", "running", "completed", "failed", "oom", "diverged")
RECORD = "result.json"

# Keys that say where or how a run is launched, not what it computes: they stay out of the run id so that
# moving the output directory or re-launching with overwrite=true finds the same run.
NON_IDENTITY_KEYS = ("hydra", "output_root", "overwrite", "run_dir", "logger", "wandb")
# ...and nested keys of the same kind: adding checkpoints to a re-submitted run must find the run it resumes
NON_IDENTITY_PATHS = (("train", "checkpoint_every"),)
# Knobs added after runs were recorded: at their default they stay out of the id, so that the runs made before the
# knob existed, which computed exactly that default, keep their ids
LATER_DEFAULTS = ((("data", "template"), "qlora"),)
# Knobs that change where a result comes from, not what it is: hashed as their default, so that the ids made before
# they were known stay what they were and setting them finds the same run (eval.cache_base=false, the way round an
# unwritable cache, recomputes the base's results instead of reading them: the same numbers; calib.load_by_block
# reads the checkpoint block by block or whole into the same quantized model)
HASHED_AS_DEFAULT = ((("eval", "cache_base"), True), (("calib", "load_by_block"), "auto"))


def run_id(config: dict) -> str:
    """Stable 12-hex-digit hash of the resolved config without output/launcher keys.

    Normalised so that equal configs hash equally: keys sorted, 16 and 16.0 the same number, shipped assets
    named by their path inside the package plus a fingerprint of their content (the checkout's location
    does not matter, a rebuilt tiny model does), every other file a knob names by its path and a fingerprint
    of its content (fingerprint.py: the same path holding other data is another run), and `train.device=auto`
    replaced by the device it means here (a run measured on the CPU is not the same run on a GPU).
    """
    identity = _normalise({k: v for k, v in config.items() if k not in NON_IDENTITY_KEYS})
    user_files = input_fingerprints(config)
    if user_files:  # absent for runs on the shipped assets alone, whose ids stay what they were
        identity["input_fingerprints"] = user_files
    for section, key in NON_IDENTITY_PATHS:
        if isinstance(identity.get(section), dict):
            identity[section].pop(key, None)
    for (section, key), default in LATER_DEFAULTS:
        if isinstance(identity.get(section), dict) and identity[section].get(key, default) == default:
            identity[section].pop(key, None)
    for (section, key), default in HASHED_AS_DEFAULT:
        if isinstance(identity.get(section), dict) and key in identity[section]:
            identity[section][key] = default
    train = identity.get("train")
    if identity.get("mode") == "train" and isinstance(train, dict) and train.get("device") == "auto":
        import torch

        train["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def input_fingerprints(config: dict) -> dict[str, str]:
    """{knob: content fingerprint} of the files the config's knobs name outside the shipped assets (those are
    fingerprinted where they are named, `_normalise`)."""
    from qpeft_bench import ASSETS

    return fingerprint.inputs(config, skip_under=str(ASSETS))


def _normalise(value):
    from qpeft_bench import ASSETS

    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.startswith(str(ASSETS)):
        return f"<assets>{value[len(str(ASSETS)) :]}@{_fingerprint(Path(value))}"
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


# Credentials: environment variables named like these hold secrets, and values shaped like these are tokens
# wherever they come from (a public repository in this field once committed a hub token inside a saved config).
SECRET_NAME = re.compile(r"(^|_)(TOKEN|API_?KEY|KEY|SECRET|PASSWORD|PASSWD|PASS|CREDENTIALS?|AUTH)(_|$)", re.IGNORECASE)
# the published formats of hub, GitHub, GitLab, OpenAI, Slack and AWS keys; bodies without '_' so that paths such as
# /data/hf_datasets_cache never match
TOKEN_SHAPE = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{30,}|api_org_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{36,}"
    r"|github_pat_[A-Za-z0-9_]{40,}|glpat-[A-Za-z0-9_\-]{20,}|sk-[A-Za-z0-9\-]{32,}"
    r"|xox[abprs]-[A-Za-z0-9\-]{10,}|AKIA[0-9A-Z]{16})"
)
REDACTED = "<redacted>"
# Config keys that hold a credential whatever its value looks like (a W&B key is 40 hex digits, no shape of its
# own): api_key, hf_token, password, ... but not a tokenizer's pad_token or eos_token
SECRET_KEY = re.compile(
    r"^(?!(?:pad|eos|bos|unk|sep|cls|mask)_token$)(?:.*_)?(?:api_?key|token|secret|password|passwd|credentials?|auth"
    r"|access_key|secret_key)$",
    re.IGNORECASE,
)
# `key=value` (an override) or `key: value` (YAML) whose last key component is such a key
_ASSIGNMENT = re.compile(r"(?P<key>[\w.~+/-]*?(?P<last>[A-Za-z0-9_]+))(?P<sep>=|:[ \t]+)(?P<value>[^\s,'\"\]}]+)")


def secret_values(environ=None) -> list[str]:
    """The values of this process' environment that are credentials: a variable named like one (HF_TOKEN,
    WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...) or a value shaped like a token. Longest first, so a secret that
    contains another is replaced whole. Values under 8 characters (flags such as 1 or false) are not secrets."""
    environ = os.environ if environ is None else environ
    found = {v for k, v in environ.items() if len(v) >= 8 and (SECRET_NAME.search(k) or TOKEN_SHAPE.fullmatch(v))}
    return sorted(found, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    """`text` with every secret value, every token-shaped string and the value of every `api_key=...` or
    `api_key: ...` assignment (SECRET_KEY) replaced by REDACTED."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _ASSIGNMENT.sub(
        lambda m: m.group(0) if not SECRET_KEY.match(m["last"]) else f"{m['key']}{m['sep']}{REDACTED}", text
    )
    return TOKEN_SHAPE.sub(REDACTED, text)


def _json_safe(value, secrets: list[str] = ()):
    """NaN and infinities become strings (bare NaN is not JSON, and strict readers reject the record); strings
    lose any credential (`secrets`, token shapes), since records are shared and committed."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {
            redact(k, secrets) if isinstance(k, str) else k: (
                REDACTED
                if isinstance(k, str) and SECRET_KEY.match(k) and isinstance(v, str)
                else _json_safe(v, secrets)
            )
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, secrets) for v in value]
    return value


def redacted(value):
    """`value` (a record, a config, any JSON-like data) as it may be written anywhere: no credential in it, NaN and
    infinities as strings."""
    return _json_safe(value, secret_values())


def redact_file(path: Path) -> None:
    """Rewrite a text file that another library wrote (Hydra's saved config and overrides) without credentials."""
    path = Path(path)
    text = path.read_text(errors="replace")
    clean = redact(text, secret_values())
    if clean != text:
        path.write_text(clean)


def umask() -> int:
    """This process' umask, read without changing it where Linux says it (/proc, kernel 4.7+); elsewhere set and put
    back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give the file at `path`, or every file under the directory at `path`, the mode a plain open() gives: 0666 less
    the umask. Temporary files (tempfile.mkstemp, safetensors' save_file) are 0600 and a rename keeps that, so without
    this a group sharing a results directory could not read the records, caches and adapters written there."""
    path = Path(path)
    mode = 0o666 & ~umask()
    for file in (p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        os.chmod(file, mode)


def atomic_write_json(path: Path, data: dict) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: readers see the old or the new
    record, never a truncated one, even if the process is killed mid-write. Credentials are redacted. The file
    gets the mode a plain open() would give it (follow_umask)."""
    safe = redacted(data)

    def dump(f) -> None:
        json.dump(safe, f, indent=2, sort_keys=False, allow_nan=False)
        f.write("\n")

    _atomic_write(path, dump, "w")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`data` into `path` as atomic_write_json writes a record (temporary file, fsync, rename, a plain open's mode)."""
    _atomic_write(path, lambda f: f.write(data), "wb")


def _atomic_write(path: Path, write, mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)
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


LOCK = ".lock"  # in the run directory


class RunLock:
    """An exclusive lock on a run directory, held for the whole run, so that two processes launching the same
    sweep never run one run twice nor write one record at the same time.

    flock(2), not a file that exists or not: the kernel drops the lock when its process dies (SIGKILL, the OOM
    killer, a preempted job), so a lock never outlives its holder and a re-run never waits on a dead one. The file
    itself stays (deleting it would race with a process that has just opened it); it holds the holder's pid. A
    flock is per open file, so the same process taking a run twice is refused too; it is not inherited across exec
    (Python opens files non-inheritable). On NFS, Linux maps flock onto POSIX locks, which the server arbitrates.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> int | None:
        """Take the lock without waiting. None: taken; else the pid of the holder (0 if it has not written it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask narrows it, as for the record
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            return int(text) if text.isdigit() else 0
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None


def memory_at_failure(device: str | None) -> dict:
    """What the process held when it ran out of memory, for the record of an `oom` run: the allocator's figures on
    CUDA; the resident set now and at its peak on the CPU (what the OOM killer and cgroup limits count)."""
    if device and device.startswith("cuda"):
        import torch

        return {
            "memory_kind": "cuda_allocated",
            "memory_allocated_bytes": torch.cuda.memory_allocated(device),
            "memory_reserved_bytes": torch.cuda.memory_reserved(device),
            "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device),
        }
    out = {"memory_kind": "cpu_rss"}
    try:  # /proc/self/statm: sizes in pages; the second is the resident set
        out["rss_bytes"] = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        out["rss_bytes"] = None
    # ru_maxrss (KiB on Linux) is the kernel's high-water mark, which it updates lazily: never below the RSS now
    out["peak_rss_bytes"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, out["rss_bytes"] or 0)
    return out


def _git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            != ""
        )
        return {"git_commit": commit, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


PACKAGES = (
    "qpeft-bench",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "hqq",
    "hydra-core",
    "omegaconf",
    "datasets",
    "lm-eval",
    "accelerate",
    "tokenizers",
)


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
