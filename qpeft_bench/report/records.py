"""Run records on disk: find every result.json under a folder (through symlinked directories), read and validate
each; a bad file is reported as unreadable (with the reason) instead of raising; a run found more than once (a copied
run directory) is kept once, and the others are listed as its duplicates."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RECORD_FILENAME = "result.json"
SUPPORTED_SCHEMAS = frozenset({"qpeft-bench/run-record/v1"})
KNOWN_STATUSES = ("planned", "running", "completed", "failed", "oom", "diverged")
# Which record of a run found twice counts: a finished result over a stopped or unfinished one.
KEEP_ORDER = ("completed", "diverged", "oom", "failed", "running", "planned")
# Sections that say where and when a record was written rather than what the run gave: a re-run of the same config
# elsewhere differs there without its results differing.
CIRCUMSTANCE_KEYS = frozenset({"meta"})


class RecordError(ValueError):
    """A result.json that cannot be used; the message is the human-readable reason."""


@dataclass(frozen=True)
class RunRecord:
    path: Path
    data: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def status(self) -> str:
        return self.data["status"]


@dataclass(frozen=True)
class Unreadable:
    path: Path
    reason: str


@dataclass(frozen=True)
class Duplicate:
    """A run whose record was found at more than one path: ``kept`` is the one every table counts; ``differ`` names
    the record sections in which the others are not the same (empty for a plain copy)."""

    kept: RunRecord
    dropped: tuple[RunRecord, ...]
    differ: tuple[str, ...]


@dataclass
class LoadResult:
    records: list[RunRecord] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)


def find_record_files(root: Path) -> list[Path]:
    """Every result.json below root, in a stable order (os.walk order depends on the filesystem). Symlinked
    directories are followed (a results folder of links to runs on scratch); a directory already walked under another
    path (a link to an ancestor, or a link and its target both below root) is not walked again, nor is a file already
    found under another path listed again: the same file is one record. A directory named result.json is listed too,
    so that it is reported as unreadable rather than silently skipped."""
    found: list[Path] = []
    walked: set[str] = set()
    files_seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in walked:
            dirnames[:] = []
            continue
        walked.add(real)
        dirnames.sort()  # the first of two paths to the same directory is the one kept, whatever the filesystem
        if RECORD_FILENAME in filenames or RECORD_FILENAME in dirnames:
            path = Path(dirpath) / RECORD_FILENAME
            real_file = os.path.realpath(path)
            if real_file not in files_seen:
                files_seen.add(real_file)
                found.append(path)
    return sorted(found)


def parse_record(path: Path) -> RunRecord:
    """Read and validate one record; raises RecordError with the reason instead of crashing."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            # a directory, or a FIFO or device that reading would block on or never finish
            raise RecordError("is a directory, not a file" if stat.S_ISDIR(mode) else "not a regular file")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"cannot read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise RecordError("invalid JSON: nested too deeply") from exc
    return validate_record(path, data)


def validate_record(path: Path, data: Any) -> RunRecord:
    """Check only what every table relies on; other sections are optional by design (planned/failed runs)."""
    if not isinstance(data, dict):
        raise RecordError(f"not a JSON object but {type(data).__name__}")
    missing = [key for key in ("schema", "run_id", "status") if key not in data]
    if missing:
        raise RecordError(f"missing {', '.join(missing)}")
    if data["schema"] not in SUPPORTED_SCHEMAS:
        raise RecordError(f"unsupported schema {data['schema']!r}")
    for key in ("run_id", "status"):
        if not isinstance(data[key], str) or not data[key]:
            raise RecordError(f"{key} is not a non-empty string")
    return RunRecord(path=path, data=data)


def end_timestamp(record: RunRecord) -> float | None:
    """meta.end_time as seconds since the epoch (a time without zone read as UTC); None when absent or unreadable."""
    meta = record.data.get("meta")
    value = meta.get("end_time") if isinstance(meta, dict) else None
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def keep_order(record: RunRecord) -> tuple[int, int, float, bool, Path]:
    """Sort key of the records of one run, the one to keep first: a finished status over an unfinished one, then the
    newest meta.end_time, then the one in the directory the runner names after the run id (the original of a copy
    such as <run_id>-copy), then the first path."""
    status = KEEP_ORDER.index(record.status) if record.status in KEEP_ORDER else len(KEEP_ORDER)
    ended = end_timestamp(record)
    return (status, ended is None, -(ended or 0.0), record.path.parent.name != record.run_id, record.path)


def differing_sections(kept: RunRecord, others: tuple[RunRecord, ...]) -> tuple[str, ...]:
    """The top-level sections in which any of ``others`` is not the same as ``kept``, compared as canonical JSON (a
    NaN is not equal to itself, but a copied NaN is the same value)."""

    def section(record: RunRecord, key: str) -> str:
        return json.dumps(record.data.get(key), sort_keys=True)

    keys = {key for record in (kept, *others) for key in record.data} - CIRCUMSTANCE_KEYS
    return tuple(sorted(k for k in keys if any(section(o, k) != section(kept, k) for o in others)))


def deduplicate(records: list[RunRecord]) -> tuple[list[RunRecord], list[Duplicate]]:
    """One record per run id (in the input order of the kept ones), and a Duplicate for each run found twice or more:
    a copied run directory is the same run, not another seed."""
    by_id: dict[str, list[RunRecord]] = {}
    for record in records:
        by_id.setdefault(record.run_id, []).append(record)
    kept: dict[str, RunRecord] = {}
    duplicates = []
    for run_id, found in by_id.items():
        first, *others = sorted(found, key=keep_order)
        kept[run_id] = first
        if others:
            duplicates.append(Duplicate(first, tuple(others), differing_sections(first, tuple(others))))
    return [r for r in records if kept[r.run_id] is r], sorted(duplicates, key=lambda d: d.kept.run_id)


def load_records(root: str | os.PathLike[str]) -> LoadResult:
    """Load every result.json under root; bad files go to ``unreadable`` rather than raising, and a run found at
    several paths is kept once (its other records go to ``duplicates``)."""
    result = LoadResult()
    records = []
    for path in find_record_files(Path(root)):
        try:
            records.append(parse_record(path))
        except RecordError as exc:
            result.unreadable.append(Unreadable(path=path, reason=str(exc)))
    result.records, result.duplicates = deduplicate(records)
    return result
