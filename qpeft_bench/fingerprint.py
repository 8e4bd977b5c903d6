"""Content fingerprints of the files a run reads, so that a run id or a cache key names what is on disk, not a path.

Replace a data file, a checkpoint or an evaluation file at the same path and the run id changes, so the finished
run is not skipped as if it were the same, and no cached base result computed on the old file is reused.

What is hashed (docs/run-record.md):
- a file up to `FULL_BYTES` (64 MiB): all of its bytes;
- a larger file (model weights): its size, its first and last MiB (a safetensors file's header with every tensor's
  name, dtype, shape and offsets sits in the first bytes) and `SAMPLES` blocks of 64 KiB spread evenly over it.
  Other weights of the same size differ in the sampled blocks; two files that differ only outside them would
  hash the same, which is the price of not reading 13-140 GB per run;
- a directory: every file under it, by relative name and content as above (hidden files and `.cache` skipped);
- a glob: every file it matches, in sorted order;
- a path that does not exist: `missing` (the run then fails its pre-flight check, which names the file).

Fingerprints are memoised per (path, size, modification time, inode, change time) within a process: a sweep of 120
runs over one checkpoint reads it once. LoftQ's cache key is made of the same fingerprints (adapters/loftq.py).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from pathlib import Path

FULL_BYTES = 64 * 2**20
EDGE_BYTES = 2**20
SAMPLES = 64
BLOCK = 64 * 2**10

# (section, key) of every config knob that names a file or directory a run reads
INPUT_KNOBS = (
    ("model", "path"),
    ("data", "path"),
    ("calib", "path"),
    ("eval", "data_root"),
    ("eval", "wikitext", "path"),
)

_MEMO: dict[tuple, str] = {}


def _file_digest(file: Path, digest) -> None:
    if not file.is_file():  # a FIFO or a device: opening one blocks or never ends; the pre-flight names it
        raise OSError(f"{file} is not a regular file")
    stat = file.stat()
    # the inode and change time too: a file replaced by another of the same size with its old modification time
    # restored (cp -p, tar, rsync -t) is a new inode or a new change time, which no tool sets back
    key = (str(file), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
    if key not in _MEMO:
        h = hashlib.sha256(str(stat.st_size).encode())
        with open(file, "rb") as f:
            if stat.st_size <= FULL_BYTES:
                for chunk in iter(lambda: f.read(2**20), b""):
                    h.update(chunk)
            else:
                h.update(f.read(EDGE_BYTES))
                step = (stat.st_size - BLOCK) // SAMPLES
                for i in range(SAMPLES):
                    f.seek(i * step)
                    h.update(f.read(BLOCK))
                f.seek(stat.st_size - EDGE_BYTES)
                h.update(f.read(EDGE_BYTES))
        _MEMO[key] = h.hexdigest()
    digest.update(_MEMO[key].encode())


def _files(path: Path) -> list[tuple[str, Path]]:
    if path.is_dir():
        out = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if not name.startswith("."):
                    file = Path(root) / name
                    out.append((str(file.relative_to(path)), file))
        return out
    return [("", path)]  # a file alone: its content, whatever it is called


def fingerprint(path: str | os.PathLike) -> str:
    """16 hex digits naming the content at `path` (a file, a directory or a glob); `missing` if nothing is there."""
    text = str(path)
    matches = sorted(glob.glob(text)) if glob.has_magic(text) else ([text] if os.path.exists(text) else [])
    if not matches:
        return "missing"
    digest = hashlib.sha256()
    for match in matches:
        for name, file in _files(Path(match)):
            digest.update(name.encode() + b"\0")
            try:
                _file_digest(file, digest)
            except OSError:  # unreadable: named as such, so a later readable copy differs
                digest.update(b"unreadable")
    return digest.hexdigest()[:16]


def _get(config: dict, keys: tuple[str, ...]):
    value = config
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def inputs(config: dict, skip_under: str | None = None) -> dict[str, str]:
    """{knob: fingerprint} of every file-valued knob the config sets (`model.path`, `data.path`, ...), leaving out
    paths under `skip_under`."""
    out = {}
    for keys in INPUT_KNOBS:
        value = _get(config, keys)
        if isinstance(value, str) and value and not (skip_under and value.startswith(skip_under)):
            out[".".join(keys)] = fingerprint(value)
    return out


def spec_inputs(spec, sections: tuple[str, ...] = ("model", "data", "calib", "eval")) -> dict[str, str]:
    """`inputs` of these sections of a checked run specification (config.RunSpec), shipped assets included: for
    cache keys."""
    return inputs({section: dataclasses.asdict(getattr(spec, section)) for section in sections})
