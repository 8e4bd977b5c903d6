"""Where a run may write, checked before Hydra creates anything there.

Hydra makes the run directory (and writes its `.hydra/` files) before any code of ours runs, so the resolvers that
name that directory (cli.py) ask here first: a typo or an unset variable is one line, and nothing is created.
"""

from __future__ import annotations

import os
from pathlib import Path

from qpeft_bench import results
from qpeft_bench.config import ConfigError, path_ok


def writable_root(value, knob: str) -> Path:
    """`value` as the root a run's files go under. Refused: empty (`output_root=$OUTDIR` with OUTDIR unset), the
    filesystem root, a path under a regular file, or one whose nearest existing folder this process cannot write."""
    text = "" if value is None else str(value)
    if not text.strip():
        raise ConfigError(f"{knob} is empty (an unset variable in a job script?); give the directory runs go to")
    path_ok("", knob, text)
    path = Path(os.path.expanduser(text))
    if path.resolve() == Path(path.resolve().anchor):
        raise ConfigError(f"{knob}={text!r} is the filesystem root; give a directory for the runs")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{knob}={text!r}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{knob}={text!r}: {existing} is not writable by this user")
    return path


def existing_run(value) -> tuple[Path, dict]:
    """mode=eval's run_dir and its record; refused when it is unset, not a directory or holds no readable record
    (a typo must not become new directories)."""
    if value is None or not str(value).strip():
        raise ConfigError("mode=eval needs run_dir=<a completed run's directory>")
    run_dir = Path(str(value))
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir={str(run_dir)!r} is not a directory (mode=eval takes a completed run's directory)")
    record = results.read_record(run_dir)
    if record is None:
        raise ConfigError(f"run_dir={str(run_dir)!r} holds no readable {results.RECORD}")
    return run_dir, record
