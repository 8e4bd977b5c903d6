"""Run records on disk: find every result.json under a folder, read and validate each; a bad file is reported as
unreadable (with the reason) instead of raising."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECORD_FILENAME = "result.json"
SUPPORTED_SCHEMAS = frozenset({"qpeft-bench/run-record/v1"})
KNOWN_STATUSES = ("planned", "running", "completed", "failed", "oom", "diverged")


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


@dataclass
class LoadResult:
    records: list[RunRecord] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)


def find_record_files(root: Path) -> list[Path]:
    """Every result.json below root, in a stable order (os.walk order depends on the filesystem)."""
    found = [Path(dirpath) / RECORD_FILENAME for dirpath, _, files in os.walk(root) if RECORD_FILENAME in files]
    return sorted(found)


def parse_record(path: Path) -> RunRecord:
    """Read and validate one record; raises RecordError with the reason instead of crashing."""
    try:
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


def load_records(root: str | os.PathLike[str]) -> LoadResult:
    """Load every result.json under root; bad files go to ``unreadable`` rather than raising."""
    result = LoadResult()
    for path in find_record_files(Path(root)):
        try:
            result.records.append(parse_record(path))
        except RecordError as exc:
            result.unreadable.append(Unreadable(path=path, reason=str(exc)))
    return result
