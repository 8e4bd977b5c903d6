"""What an evaluation result covers: the whole benchmark ("full"), part of it because a cap cut it ("limited"), or
the few items we ship for wiring checks ("fixtures"); and how many contexts lm-eval truncated to the model's length.

A run records one coverage entry per task and stage beside the results, at record["eval"]["coverage"][stage][task]:

    {"kind": "full" | "limited" | "fixtures",
     "why": "<the reasons, '; '-joined, e.g. 'eval.harness.limit=3 items per task'>",   (absent when full)
     "truncated": <int>}   (lm-eval task sets: items whose context lm-eval cut from the left; absent otherwise)

Beside, not inside: `ppl_heldout` is a bare float that every reader (records of older versions, the report, the
base cache, users' scripts) reads as one, and one place holds the entry of every task alike. "fixtures" wins over
"limited" (a limit on the fixtures is still the fixtures) and `why` names every reason. A result without an entry
(older records, `speed`, which measures time, not a benchmark) is read as full. No torch here: the report reads it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qpeft_bench import ASSETS

FULL, LIMITED, FIXTURES = "full", "limited", "fixtures"
KINDS = (FULL, LIMITED, FIXTURES)


@dataclass(frozen=True)
class Covered:
    """What a runner returns when it knows its coverage: the result as the record keeps it, and its entry.
    (A dataclass, not a tuple, so that it cannot end up in a record as a list by mistake.)"""

    value: Any
    coverage: dict


def entry(limits: Sequence[str] = (), fixtures: str | None = None, truncated: int | None = None) -> dict:
    """The coverage entry of a result: `limits` are the caps that cut it ('eval.max_batches=2 batches'),
    `fixtures` the shipped data it read ('shipped fixtures (qpeft_bench/assets/eval_fixtures)')."""
    reasons = [fixtures, *limits] if fixtures else list(limits)
    out: dict = {"kind": FIXTURES if fixtures else LIMITED if limits else FULL}
    if reasons:
        out["why"] = "; ".join(reasons)
    if truncated is not None:
        out["truncated"] = int(truncated)
    return out


def shipped(path: str | os.PathLike | None) -> str | None:
    """'shipped fixtures (qpeft_bench/assets/<...>)' when `path` lies in the package's assets, else None."""
    if path is None:
        return None
    try:
        rel = os.path.realpath(path)
        inside = os.path.relpath(rel, os.path.realpath(ASSETS))
    except ValueError:  # another drive (Windows)
        return None
    if inside == os.pardir or inside.startswith(os.pardir + os.sep):
        return None
    where = "/".join(("qpeft_bench", "assets", *([] if inside == os.curdir else inside.split(os.sep))))
    return f"shipped fixtures ({where})"


def split(out) -> tuple[Any, dict | None]:
    """A runner's return -> (result, coverage entry or None)."""
    return (out.value, out.coverage) if isinstance(out, Covered) else (out, None)


def of(record: dict, stage: str, task: str) -> dict | None:
    """The coverage entry of a record's result (None: not recorded, i.e. an older record or a task without one)."""
    cov = record.get("eval", {}) if isinstance(record, dict) else None
    for key in ("coverage", stage, task):
        cov = cov.get(key) if isinstance(cov, dict) else None
    return cov if isinstance(cov, dict) else None


def not_full(cov: dict | None) -> str | None:
    """Why a result is not the full benchmark (its `why`), or None when it is full or says nothing."""
    if not cov or cov.get("kind", FULL) == FULL:
        return None
    return str(cov.get("why") or cov["kind"])
