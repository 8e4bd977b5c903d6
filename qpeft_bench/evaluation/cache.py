"""The cache of the quantized base's evaluation results ("before"), shared by the runs of a sweep."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from qpeft_bench.evaluation.items import ItemsError, check_task, mismatch
from qpeft_bench.results import atomic_write_json

log = logging.getLogger("qpeft_bench")
MAX_ENTRY_BYTES = 64 * 2**20  # a task set's result with every subtask is a few hundred KiB


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

    def _entry(self, task: str) -> dict | None:
        """The stored entry of `task` when it is one this cache wrote for exactly this identity and these settings;
        None when absent. A file that is there but holds something else (torn by a full disk, edited, copied from
        another machine's cache under this name) is never trusted: a warning, and the result is computed again."""
        path = self.path(task)
        if not path.exists():
            return None
        if not path.is_file() or path.stat().st_size > MAX_ENTRY_BYTES:  # a FIFO would hang, /dev/zero never ends
            log.warning(
                "base-eval cache entry %s is not a regular file of a cache entry's size; computing it again", path
            )
            return None
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("base-eval cache entry %s is unreadable (%s); computing it again", path, err)
            return None
        expected = _plain({"task": task, "identity": self.identity, "settings": self.settings.get(task)})
        if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in expected.items()):
            log.warning("base-eval cache entry %s is not this base's result for %s; computing it again", path, task)
            return None
        if entry.get("result") is None:
            log.warning("base-eval cache entry %s holds no result; computing it again", path)
            return None
        if entry.get("items") is not None and _items_problem(task, entry["items"], entry["result"]):
            log.warning(
                "base-eval cache entry %s holds per-item results that are malformed or do not give its result; "
                "computing it again",
                path,
            )
            return None
        return entry

    def get(self, task: str, valid: Callable[[object], bool] = lambda result: True):
        """The cached result of `task`, or None. `valid(result)`: the task's own check of its result's shape (a
        finite headline number), so a malformed value never lands in a record."""
        entry = self._entry(task)
        if entry is None:
            return None
        if not valid(entry["result"]):
            log.warning("base-eval cache entry %s holds a malformed result; computing it again", self.path(task))
            return None
        return entry["result"]

    def coverage(self, task: str) -> dict | None:
        """The cached result's coverage entry (evaluation/coverage.py), None when it has none."""
        entry = self._entry(task)
        return None if entry is None else entry.get("coverage")

    def items(self, task: str) -> dict | None:
        """The cached result's per-item results (items.py), None when it has none. An entry without them (a task
        without items, or one stored by code before items were kept, which a code fingerprint of its own keeps
        out of reach anyway) is still the base's result: it is used, and only its items are missing."""
        entry = self._entry(task)
        return None if entry is None else entry.get("items")

    def put(self, task: str, result, coverage: dict | None = None, items: dict | None = None) -> None:
        """Store a result (with its coverage entry and per-item results when it has them). A cache that cannot be
        written ($QPEFT_CACHE or $HOME read-only, a full disk) is a warning: the run has its result and goes on, only
        the next run computes it again."""
        entry = {"task": task, "identity": self.identity, "settings": self.settings.get(task), "result": result}
        extra = {k: v for k, v in (("coverage", coverage), ("items", items)) if v is not None}
        try:
            atomic_write_json(self.path(task), {**entry, **extra})
        except OSError as err:
            log.warning("base-eval cache not written (%s: %s); the run goes on without it", self.path(task), err)


def _items_problem(task: str, items: dict, result) -> str | None:
    try:
        check_task(task, items)
    except ItemsError as err:
        return str(err)
    return mismatch(items, result)


def _plain(value):
    """`value` as it reads back from the JSON file (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))
