"""From run records to the statistics of stats.py: which per-item values a quality column resamples (the record's
`eval.items` file, evaluation/items.py), the interval of every aggregated quality cell, and the paired comparisons of
a table's cells against their baselines, Holm-corrected over the table."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import qpeft_bench.report.stats as stats
from qpeft_bench.evaluation.items import REL_TOL, ItemsError, read_items
from qpeft_bench.report.rows import INTERVALS, MARKS, RECORD_FIELDS, Row
from qpeft_bench.report.tables import SIGNIFICANT, Agg, Table

# The key columns of the aggregated tables (catalog.py) a baseline can name; an unknown one would match no row and
# silently make no comparison.
BASELINE_KEYS = ("model", "dataset", "quant_setting", "method_name", "r", "alpha", "layer_group")


@dataclass(frozen=True)
class Baseline:
    """What a cell is compared with: the row that equals it in every key but these, which take these values
    (default: the uniform layer-group setting of the same model, data, quantizer, method and ranks)."""

    values: tuple[tuple[str, str], ...] = (("layer_group", "uniform"),)

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values)

    @staticmethod
    def parse(text: str) -> Baseline:
        """'method_name=lora,r=64' -> Baseline; keys are the tables' row keys (see rows.RECORD_FIELDS and the
        derived method_name, quant_setting, layer_group)."""
        pairs = []
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ValueError(f"--baseline {text!r}: expected KEY=VALUE[,KEY=VALUE...], got {part!r}")
            key = key.strip()
            if key not in BASELINE_KEYS:
                raise ValueError(f"--baseline {text!r}: {key!r} is not a row key; keys: {', '.join(BASELINE_KEYS)}")
            if key in dict(pairs):
                raise ValueError(f"--baseline {text!r}: {key} is named twice")
            pairs.append((key, value.strip()))
        return Baseline(tuple(pairs))


@dataclass
class Settings:
    """The report's uncertainty knobs (qpeft-bench-report --bootstrap, --baseline)."""

    replicates: int = stats.DEFAULT_REPLICATES
    level: float = stats.LEVEL
    baseline: Baseline = field(default_factory=Baseline)


def item_selector(key: str) -> tuple[str, str, tuple[str, ...]] | None:
    """(stage, task, what) of a row key whose value per-item results can reproduce: what = () for a task's headline
    (a perplexity, a task set's `average`), ('average', name) for another average, ('entry', name) for one task of a
    set. None for keys that are not evaluation results (memory, time, counts)."""
    path = RECORD_FIELDS.get(key)
    if path is None or len(path) < 3 or path[0] != "eval" or path[1] not in ("before", "after"):
        return None
    stage, task, rest = path[1], path[2], path[3:]
    if task in ("ppl_heldout",) and not rest:
        return stage, task, ()
    if task == "ppl_wikitext" and rest == ("ppl",):
        return stage, task, ()
    if len(rest) == 1 and rest[0].startswith("average"):
        return stage, task, ("average", rest[0])
    if len(rest) == 3 and rest[0] == "tasks" and rest[2] == "value":
        return stage, task, ("entry", rest[1])
    return None


def to_items(task_items: Mapping[str, Any], what: tuple[str, ...]) -> stats.Items:
    """The stats.Items of one task's per-item results (ITEMS: the file's stages.<stage>.<task>) for a selector."""
    if task_items["kind"] == "nll":
        nll = np.asarray(task_items["nll"], dtype=np.float64)
        return stats.Items(
            "nll", (nll,), tokens=np.asarray(task_items["tokens"], dtype=np.float64), ids=(tuple(task_items["ids"]),)
        )
    entries, leaves = task_items["entries"], task_items["leaves"]
    if what and what[0] == "entry":
        weights = {leaf: 1 / len(entries[what[1]]) for leaf in entries[what[1]]}
    else:
        members = task_items["averages"][what[1] if what else "average"]
        weights = {}
        for entry in members:
            for leaf in entries[entry]:
                weights[leaf] = weights.get(leaf, 0.0) + 1 / (len(members) * len(entries[entry]))
    names = sorted(weights)
    return stats.Items(
        "scores",
        tuple(np.asarray(leaves[n]["scores"], dtype=np.float64) for n in names),
        tuple(weights[n] for n in names),
        ids=tuple((n, tuple(leaves[n]["doc_ids"])) for n in names),
    )


class ItemSource:
    """Per-item results of the rows' records, read once per record; a record whose file is missing, damaged or
    stale is remembered with the reason (the tables' notes say it) and gives no items."""

    def __init__(self) -> None:
        self._files: dict[str, dict | None] = {}
        self.problems: dict[str, str] = {}  # run id -> why its per-item results were not used

    def _file(self, row: Row) -> dict | None:
        path = row["record_path"]
        if path not in self._files:
            try:
                self._files[path] = read_items(
                    Path(path), {"run_id": row["run_id"], "eval": {"items": row.get("items_ref")}}
                )
            except ItemsError as exc:
                self._files[path] = None
                self.problems[str(row["run_id"])] = str(exc)
        return self._files[path]

    def items(self, row: Row, key: str) -> stats.Items | None:
        selector = item_selector(key)
        content = self._file(row) if selector is not None else None
        if content is None:
            return None
        stage, task, what = selector
        task_items = content.get("stages", {}).get(stage, {}).get(task)
        if task_items is None:
            return None
        try:
            items = to_items(task_items, what)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            self.problems[str(row["run_id"])] = f"per-item results of {task} unusable ({exc})"
            return None
        value = row.get(key)
        # the items must give the number the record holds (to the writer's tolerance): a file left from another
        # evaluation never feeds a cell
        if not isinstance(value, (int, float)) or not math.isclose(
            items.point(), value, rel_tol=REL_TOL, abs_tol=1e-12
        ):
            self.problems[str(row["run_id"])] = f"per-item results of {task} do not give the record's {key}"
            return None
        return items


def _seed(*parts: Any) -> int:
    """A fixed seed per cell, so that a report is byte-identical when made again from the same records."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def cell_interval(members: Sequence[Row], key: str, source: ItemSource, settings: Settings):
    """The interval of one cell from its runs' items, or None (a run without items, or runs on different items).
    Seeded by the runs and the metric, so the same runs give the same interval in every table."""
    if settings.replicates <= 0 or not members:
        return None
    runs = [source.items(row, key) for row in members]
    if any(r is None for r in runs) or not stats.pairable(runs):
        return None
    return stats.interval(
        runs,
        replicates=settings.replicates,
        level=settings.level,
        seed=_seed(*sorted(str(r["run_id"]) for r in members), key),
    )


@dataclass(frozen=True)
class Tested:
    """One comparison of a table: where it is (row keys, column), the comparison, whether it entered the Holm family
    (False for a cell or baseline from a limited or fixtures evaluation), and the runs of each side."""

    row: tuple
    column: str
    metric: str
    comparison: stats.Comparison
    in_family: bool
    runs: tuple[int, int]


def compare_cells(
    pairs: Sequence[tuple[tuple, str, str, Sequence[Row], Sequence[Row], str]],
    source: ItemSource,
    settings: Settings,
) -> list[Tested]:
    """Paired comparisons of (row key, column, metric key, cell runs, baseline runs, baseline label), Holm-adjusted
    over those that enter the family. A pair whose runs lack items, or saw different items, is not compared."""
    out: list[Tested] = []
    for row_key, column, key, cell, base, label in pairs:
        if settings.replicates <= 0:
            break
        cell_items = [source.items(r, key) for r in cell]
        base_items = [source.items(r, key) for r in base]
        if any(i is None for i in (*cell_items, *base_items)) or not stats.pairable([*cell_items, *base_items]):
            continue
        comparison = stats.compare(
            cell_items,
            base_items,
            baseline=label,
            seeds=([r.get("seed") for r in cell], [r.get("seed") for r in base]),
            replicates=settings.replicates,
            level=settings.level,
            seed=_seed(*sorted(str(r["run_id"]) for r in cell), "vs", *sorted(str(r["run_id"]) for r in base), key),
        )
        limited = any(key in (r.get(MARKS) or {}) for r in (*cell, *base))
        out.append(Tested(row_key, column, key, comparison, not limited, (len(cell), len(base))))
    family = [t for t in out if t.in_family]
    adjusted = dict(zip(map(id, family), stats.holm([t.comparison.p for t in family]), strict=True))
    return [replace(t, comparison=replace(t.comparison, p_holm=adjusted.get(id(t)))) for t in out]


def with_stats(agg: Agg, interval: stats.Interval | None, tested: Tested | None) -> Agg:
    return replace(agg, interval=interval, comparison=tested.comparison if tested else None)


def notes(settings: Settings, intervals: int, without: int, tested: Sequence[Tested], problems: Mapping) -> list[str]:
    """What the table's intervals and marks mean, and which cells have none and why."""
    out = []
    if intervals:
        out.append(
            f"[low, high]: {settings.level:.0%} percentile bootstrap interval of the cell's mean, "
            f"{settings.replicates} replicates: the evaluation items resampled within each run (one draw shared by "
            "the runs of a cell, which saw the same items; perplexities resample examples or windows) and, where a "
            "cell has several runs, the runs resampled (its seeds, and its configurations where the table "
            "averages over them)."
        )
    if without:
        out.append(f"{without} quality cells have no interval: some of their runs kept no per-item results.")
    if tested:
        family = sum(t.in_family for t in tested)
        out.append(
            "Δ: the cell minus its baseline on the same items (paired bootstrap interval, runs paired by seed where "
            f"both sides have the same seeds); {SIGNIFICANT}: the interval excludes zero after Holm's correction over "
            f"this table's {family} comparisons (family-wise {1 - settings.level:.0%})."
        )
        limited = len(tested) - family
        if limited:
            out.append(
                f"{limited} comparisons involve a limited or fixtures evaluation (†): shown, but not tested (no "
                f"{SIGNIFICANT}, not in the Holm family)."
            )
    for run_id, why in sorted(problems.items()):
        out.append(f"per-item results of run {run_id} not used: {why}")
    return out


def add_run_intervals(table: Table, settings: Settings) -> Table:
    """A per-run table (one row per record) with each quality value's own interval: the run's items resampled. The
    notes say so, and name the runs whose items could not be used."""
    if settings.replicates <= 0:
        return table
    source = ItemSource()
    keys = [col.key for col in table.spec.columns if item_selector(col.key) is not None]
    count = 0
    for row in table.rows:
        found = {key: cell_interval([row], key, source, settings) for key in keys if row.get(key) is not None}
        row[INTERVALS] = {key: interval for key, interval in found.items() if interval is not None}
        count += len(row[INTERVALS])
    if not count and not source.problems:
        return table
    notes = list(table.notes)
    if count:
        notes.append(
            f"[low, high]: {settings.level:.0%} percentile bootstrap interval of the run's value, "
            f"{settings.replicates} replicates of its evaluation items (examples or windows for perplexities)."
        )
    notes += [f"per-item results of run {run_id} not used: {why}" for run_id, why in sorted(source.problems.items())]
    return replace(table, notes=notes)
