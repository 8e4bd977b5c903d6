"""The cache of the quantized base's evaluation results ("before"), shared by the runs of a sweep."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qpeft_bench.results import atomic_write_json


class BaseEvalCache:
    """Results of the quantized base per task, on disk under $QPEFT_CACHE/base_eval (default
    ~/.cache/qpeft-bench/base_eval). `identity` holds everything the base's results depend on except the task's
    own settings, which `settings` maps per task."""

    def __init__(self, identity: dict, settings: dict[str, dict], root: Path | None = None):
        base = os.environ.get("QPEFT_CACHE")
        self.root = root or (Path(base) if base else Path.home() / ".cache" / "qpeft-bench") / "base_eval"
        self.identity, self.settings = identity, settings

    def key(self, task: str) -> str:
        blob = json.dumps(
            {"identity": self.identity, "task": task, "settings": self.settings.get(task)}, sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def path(self, task: str) -> Path:
        return self.root / f"{task}-{self.key(task)}.json"

    def get(self, task: str, key: str = "result"):
        try:
            return json.loads(self.path(task).read_text())[key]
        except (OSError, ValueError, KeyError):  # absent or unreadable: compute it again
            return None

    def coverage(self, task: str) -> dict | None:
        """The cached result's coverage entry (evaluation/coverage.py), None when it has none."""
        return self.get(task, "coverage")

    def put(self, task: str, result, coverage: dict | None = None) -> None:
        entry = {"task": task, "identity": self.identity, "settings": self.settings.get(task), "result": result}
        atomic_write_json(self.path(task), entry if coverage is None else {**entry, "coverage": coverage})
