"""Per-item evaluation results (issue 21): what a report needs to resample an evaluation, kept beside the record.

One gzipped JSON file per run directory, `eval_items.json.gz`, beside `result.json` (which only points at it, under
`eval.items`: the file's name, the sha256 of its bytes and the format's version), so that the record stays small:

    {"format": "qpeft-bench eval items", "version": 1, "run_id": "<run id>",
     "stages": {"before": {TASK: ITEMS, ...}, "after": {TASK: ITEMS, ...}}}

A perplexity task keeps the NLL sum (nats) and the predicted tokens of each unit, an example of the validation
split (ids: its index there) or a WikiText window (ids: its index):

    {"kind": "nll", "unit": "example" | "window", "ids": [...], "nll": [...], "tokens": [...]}

An lm-eval task set keeps the per-document score of each entry's reported metric and filter, per lm-eval leaf task
(an entry such as mmlu stands for its 57 leaves), and which entries each of the record's averages is over:

    {"kind": "scores", "leaves": {LEAF: {"doc_ids": [...], "scores": [...]}}, "entries": {ENTRY: [LEAF, ...]},
     "averages": {"average": [ENTRY, ...], ...}}

The numbers the record reports follow from them as the evaluation computed them: a perplexity is
exp(sum(nll) / sum(tokens)), an entry's value the unweighted mean of its leaves' mean scores, an average the
unweighted mean of its entries' values (`headline`, `entry_value`, `average`; `mismatch` compares them with a
result). Items pair across runs by (task, id) or (leaf, doc_id). The file is byte-stable (sorted keys, gzip mtime
0): the same evaluation writes the same bytes. Pure Python: the report imports this without torch or numpy.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import zlib
from pathlib import Path

from qpeft_bench.results import atomic_write_bytes

FILE = "eval_items.json.gz"  # in the run directory, beside result.json
FORMAT = "qpeft-bench eval items"
VERSION = 1
MAX_FILE_BYTES = 64 * 2**20  # gzipped; every task set on both stages is a few hundred KiB
MAX_JSON_BYTES = 512 * 2**20  # unpacked: a small file that unpacks without end is refused, not read
KINDS = ("nll", "scores")
UNITS = ("example", "window")
REL_TOL = 1e-9  # items and the record agree to float rounding


class ItemsError(ValueError):
    """A run's items file that cannot be used: missing, unreadable, too large, altered, or of the wrong shape."""


# ----------------------------------------------------------------------------------------------------------------
# Building a task's items
# ----------------------------------------------------------------------------------------------------------------


def nll_items(unit: str, ids: list[int], nll: list[float], tokens: list[int]) -> dict:
    """A perplexity task's items, ordered by id (the split's or the text's order, whatever order they ran in)."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return {
        "kind": "nll",
        "unit": unit,
        "ids": [int(ids[i]) for i in order],
        "nll": [float(nll[i]) for i in order],
        "tokens": [int(tokens[i]) for i in order],
    }


def score_items(leaves: dict[str, dict], entries: dict[str, list[str]], averages: dict) -> dict:
    """A task set's items: `leaves` {leaf: {"doc_ids", "scores"}}, `entries` {entry: [leaf, ...]} and `averages`
    {name: [entry, ...]} (harness.TASK_SETS[set]["averages"])."""
    return {
        "kind": "scores",
        "leaves": {
            leaf: {"doc_ids": [int(d) for d in v["doc_ids"]], "scores": [float(s) for s in v["scores"]]}
            for leaf, v in leaves.items()
        },
        "entries": {entry: list(members) for entry, members in entries.items()},
        "averages": {name: list(members) for name, members in averages.items()},
    }


# ----------------------------------------------------------------------------------------------------------------
# The numbers they give
# ----------------------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)  # as lm-eval's `mean` aggregation and summarize() compute it


def headline(items_task: dict) -> float:
    """The task's one number: the perplexity, or the task set's `average`."""
    if items_task["kind"] == "nll":
        return math.exp(math.fsum(items_task["nll"]) / sum(items_task["tokens"]))
    return average(items_task, "average")


def entry_value(items_task: dict, entry: str) -> float:
    """An lm-eval entry's value (the record's eval.<stage>.<task>.tasks.<entry>.value): the unweighted mean over
    its leaves of their mean score."""
    leaves = items_task["leaves"]
    return _mean([_mean(leaves[leaf]["scores"]) for leaf in items_task["entries"][entry]])


def average(items_task: dict, name: str) -> float:
    """One of a task set's averages (`average`, `average_4`): the unweighted mean of its entries' values."""
    return _mean([entry_value(items_task, e) for e in items_task["averages"][name]])


def _close(a, b) -> bool:
    return isinstance(b, (int, float)) and not isinstance(b, bool) and math.isclose(a, b, rel_tol=REL_TOL, abs_tol=0)


def mismatch(items_task: dict, result) -> str | None:
    """Why `items_task` does not give the numbers of the task's recorded `result` (a perplexity, a WikiText result
    with its "ppl", or a task set's result with its entries and averages), or None when it does (1e-9 relative)."""
    if items_task["kind"] == "nll":
        value = result.get("ppl") if isinstance(result, dict) else result
        got = headline(items_task)
        return None if _close(got, value) else f"the items give perplexity {got!r}, the result {value!r}"
    if not isinstance(result, dict) or not isinstance(result.get("tasks"), dict):
        return "the result is not a task set's"
    if set(items_task["entries"]) != set(result["tasks"]):
        return f"the items have entries {sorted(items_task['entries'])}, the result {sorted(result['tasks'])}"
    for entry, reported in result["tasks"].items():
        got, value = entry_value(items_task, entry), reported.get("value") if isinstance(reported, dict) else None
        if not _close(got, value):
            return f"the items give {entry} {got!r}, the result {value!r}"
    for name in items_task["averages"]:
        got = average(items_task, name)
        if not _close(got, result.get(name)):
            return f"the items give {name} {got!r}, the result {result.get(name)!r}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Shape
# ----------------------------------------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return (isinstance(x, float) or _is_int(x)) and math.isfinite(x)


def _ids(where: str, ids) -> None:
    if not isinstance(ids, list) or not ids:
        raise ItemsError(f"{where}: not a non-empty list")
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise ItemsError(f"{where}: not all ids are integers >= 0")
    if len(set(ids)) != len(ids):
        raise ItemsError(f"{where}: an id repeats")


def _numbers(where: str, values, n: int) -> None:
    if not isinstance(values, list) or len(values) != n:
        raise ItemsError(f"{where}: not a list of {n} numbers (one per id)")
    if not all(_is_num(v) for v in values):
        raise ItemsError(f"{where}: not all values are finite numbers")


def _names(where: str, members, known) -> None:
    if not isinstance(members, list) or not members or not all(isinstance(m, str) and m in known for m in members):
        raise ItemsError(f"{where}: not a non-empty list of names among {sorted(known)}")


def check_task(where: str, items_task) -> None:
    """Raise ItemsError when one task's items do not have the format's shape (module doc)."""
    if not isinstance(items_task, dict) or items_task.get("kind") not in KINDS:
        raise ItemsError(f"{where}: not a task's items (kind one of {KINDS})")
    if items_task["kind"] == "nll":
        if items_task.get("unit") not in UNITS:
            raise ItemsError(f"{where}.unit: {items_task.get('unit')!r} is not one of {UNITS}")
        ids = items_task.get("ids")
        _ids(f"{where}.ids", ids)
        _numbers(f"{where}.nll", items_task.get("nll"), len(ids))
        if any(v < 0 for v in items_task["nll"]):
            raise ItemsError(f"{where}.nll: a negative NLL sum")
        tokens = items_task.get("tokens")
        if not isinstance(tokens, list) or len(tokens) != len(ids) or not all(_is_int(t) and t > 0 for t in tokens):
            raise ItemsError(f"{where}.tokens: not a list of {len(ids)} integers > 0 (one per id)")
        return
    leaves, entries, averages = (items_task.get(k) for k in ("leaves", "entries", "averages"))
    for key, value in (("leaves", leaves), ("entries", entries), ("averages", averages)):
        if not isinstance(value, dict) or not value:
            raise ItemsError(f"{where}.{key}: not a non-empty mapping")
    for leaf, docs in leaves.items():
        if not isinstance(docs, dict):
            raise ItemsError(f"{where}.leaves.{leaf}: not a mapping of doc_ids and scores")
        _ids(f"{where}.leaves.{leaf}.doc_ids", docs.get("doc_ids"))
        _numbers(f"{where}.leaves.{leaf}.scores", docs.get("scores"), len(docs["doc_ids"]))
    for entry, members in entries.items():
        _names(f"{where}.entries.{entry}", members, leaves)
    for name, members in averages.items():
        _names(f"{where}.averages.{name}", members, entries)


def check(content) -> None:
    """Raise ItemsError when a parsed items file does not have the format's shape."""
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ItemsError(f"not a {FORMAT!r} file")
    if content.get("version") != VERSION:
        raise ItemsError(f"version {content.get('version')!r}; this code reads version {VERSION}")
    if not isinstance(content.get("run_id"), str):
        raise ItemsError("no run_id")
    stages = content.get("stages")
    if not isinstance(stages, dict) or not all(isinstance(tasks, dict) for tasks in stages.values()):
        raise ItemsError("stages: not a mapping of stages to {task: items}")
    for stage, tasks in stages.items():
        for task, items_task in tasks.items():
            check_task(f"stages.{stage}.{task}", items_task)


# ----------------------------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------------------------


def encode(run_id: str, stages: dict) -> bytes:
    """The file's bytes: sorted-key JSON, gzipped with mtime 0, so that the same items give the same bytes."""
    content = {"format": FORMAT, "version": VERSION, "run_id": run_id, "stages": stages}
    check(content)
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def write_items(run_dir, run_id: str, stages: dict) -> dict:
    """Write `stages` ({stage: {task: items}}) to the run's items file (atomically; the same bytes already there are
    left alone) and return the record's reference to it, for record["eval"]["items"]. OSError when it cannot be
    written; ItemsError when `stages` are not of the format's shape."""
    data = encode(run_id, stages)
    path = Path(run_dir) / FILE
    try:
        same = path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        same = False
    if not same:
        atomic_write_bytes(path, data)
    return {"file": FILE, "sha256": hashlib.sha256(data).hexdigest(), "version": VERSION}


def reference(record: dict) -> dict | None:
    """The record's eval.items (None: the run kept no items)."""
    ev = record.get("eval") if isinstance(record, dict) else None
    return ev.get("items") if isinstance(ev, dict) else None


def read_items(record_path, record: dict) -> dict | None:
    """The parsed items file of the record at `record_path` ({"format", "version", "run_id", "stages"}), None when
    the record has no eval.items. ItemsError(reason) when the reference is malformed or the file is missing, not a
    regular file, over MAX_FILE_BYTES, altered (sha256), unreadable, of another run, or of the wrong shape."""
    ref = reference(record)
    if ref is None:
        return None
    if not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or not isinstance(ref.get("sha256"), str):
        raise ItemsError(f"eval.items is not a reference to an items file: {ref!r}")
    if ref.get("version") != VERSION:
        raise ItemsError(f"eval.items has version {ref.get('version')!r}; this code reads version {VERSION}")
    name = ref["file"]
    if not name or name in (".", "..") or "/" in name or "\\" in name:  # beside the record, never elsewhere
        raise ItemsError(f"eval.items.file {name!r} is not a file name in the run directory")
    path = Path(record_path).parent / name
    if not path.exists():
        raise ItemsError(f"{path} is missing")
    if not path.is_file():  # a FIFO would hang the reader
        raise ItemsError(f"{path} is not a regular file")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ItemsError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
        data = path.read_bytes()
    except OSError as err:
        raise ItemsError(f"{path} is unreadable ({err})") from err
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise ItemsError(f"{path} is not the file the record was written with (sha256 differs)")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as unpacked:
            text = unpacked.read(MAX_JSON_BYTES + 1)
        if len(text) > MAX_JSON_BYTES:
            raise ItemsError(f"{path} unpacks to more than {MAX_JSON_BYTES} bytes")
        content = json.loads(text)
    except (OSError, EOFError, zlib.error, ValueError) as err:
        if isinstance(err, ItemsError):
            raise
        raise ItemsError(f"{path} is unreadable ({type(err).__name__}: {err})") from err
    try:
        check(content)
    except ItemsError as err:
        raise ItemsError(f"{path}: {err}") from err
    if content["run_id"] != record.get("run_id"):
        raise ItemsError(f"{path} holds the items of run {content['run_id']}, not {record.get('run_id')}")
    return content
