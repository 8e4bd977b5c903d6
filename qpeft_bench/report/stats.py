"""Uncertainty of the report's quality cells: bootstrap intervals over the items a run was evaluated on (and over
the runs of a cell), paired bootstrap comparisons against a baseline on the same items, and Holm's correction over
a table's comparisons."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A two-sided interval of a cell's mean; ``how`` says what was resampled (for the table's notes)."""

    low: float
    high: float
    level: float = 0.95
    how: str = ""

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Comparison:
    """A cell against its baseline on the same items: the difference of means (cell - baseline), its paired
    bootstrap interval, the two-sided bootstrap p-value, Holm's adjusted p over the table's comparisons, and
    whether the adjusted p is below 1 - level (the interval then excludes zero)."""

    baseline: str
    diff: float
    low: float
    high: float
    p: float
    p_holm: float | None = None
    level: float = 0.95
    replicates: int = 0  # the bootstrap's replicates: a p of 0 means below 1 / replicates

    @property
    def significant(self) -> bool:
        return self.p_holm is not None and self.p_holm < 1 - self.level


# --------------------------------------------------------------------------- per-item values of one run

DEFAULT_REPLICATES = 2000
LEVEL = 0.95
# Bound on the bootstrap's count matrices (replicates x items), so that a 14k-item MMLU costs tens of MB, not GB.
_CHUNK_CELLS = 4_000_000


@dataclass(frozen=True)
class Items:
    """One run's per-item values of one metric, as the bootstrap resamples them. ``kind`` 'scores': ``strata`` are
    the leaf tasks, each an array of per-document scores, and the metric is sum_l weights[l] * mean(strata[l]) (an
    unweighted mean over subjects and tasks is such a sum); items are resampled within each leaf. 'nll': one stratum
    of units (examples or windows) with their summed NLL in ``strata[0]`` and their predicted tokens in ``tokens``;
    the metric is exp(sum nll / sum tokens). ``ids`` name each stratum's items, so that two runs are compared on the
    same items only when their ids agree."""

    kind: str
    strata: tuple[np.ndarray, ...]
    weights: tuple[float, ...] = (1.0,)
    tokens: np.ndarray | None = None
    ids: tuple = ()

    def point(self) -> float:
        if self.kind == "nll":
            return math.exp(float(self.strata[0].sum()) / float(self.tokens.sum()))
        return float(sum(w * s.mean() for w, s in zip(self.weights, self.strata, strict=True)))

    def values(self, draws: Sequence[np.ndarray]) -> np.ndarray:
        """The metric under each bootstrap replicate: draws[l] is (replicates, items of stratum l), the indices of
        the items drawn (with replacement) from stratum l."""
        if self.kind == "nll":
            return np.exp(self.strata[0][draws[0]].sum(axis=1) / self.tokens[draws[0]].sum(axis=1))
        return sum(w * s[d].mean(axis=1) for w, d, s in zip(self.weights, draws, self.strata, strict=True))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s.size for s in self.strata)


def _draws(rng: np.random.Generator, sizes: Sequence[int], replicates: int) -> list[np.ndarray]:
    """A stratified bootstrap's draws: per replicate, n_l item indices drawn with replacement from stratum l."""
    return [rng.integers(0, n, size=(replicates, n)) for n in sizes]


def _chunks(total: int, sizes: Sequence[int]) -> list[int]:
    step = max(1, _CHUNK_CELLS // max(1, sum(sizes)))
    return [min(step, total - start) for start in range(0, total, step)]


def _run_values(runs: Sequence[Items], rng: np.random.Generator, replicates: int) -> np.ndarray:
    """(runs, replicates): every run's metric under the SAME item draws. The runs of a cell were evaluated on the
    same items, so the item sample is one source of uncertainty they share, not one per run."""
    sizes = runs[0].sizes
    parts = []
    for chunk in _chunks(replicates, sizes):
        draws = _draws(rng, sizes, chunk)
        parts.append(np.stack([run.values(draws) for run in runs]))
    return np.concatenate(parts, axis=1)


def _seed_means(values: np.ndarray, rng: np.random.Generator, picks: np.ndarray | None = None) -> np.ndarray:
    """The mean over runs per replicate, with the runs resampled (with replacement) when there are several: the
    spread between seeds enters the interval. ``picks`` (replicates, runs) reuses a draw (paired seeds)."""
    n_runs, replicates = values.shape
    if n_runs == 1:
        return values[0]
    if picks is None:
        picks = rng.integers(0, n_runs, size=(replicates, n_runs))
    return values[picks, np.arange(replicates)[:, None]].mean(axis=1)


def pairable(runs: Sequence[Items]) -> bool:
    """Whether the runs were evaluated on the same items (same kind, strata, weights and ids)."""
    first = runs[0]
    return all(
        r.kind == first.kind and r.sizes == first.sizes and r.weights == first.weights and r.ids == first.ids
        for r in runs
    )


def how(n_runs: int) -> str:
    return "items resampled" + (f", {n_runs} runs resampled" if n_runs > 1 else " (1 run)")


def interval(
    runs: Sequence[Items], *, replicates: int = DEFAULT_REPLICATES, level: float = LEVEL, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean over ``runs`` of their metric: items resampled within each run (one
    draw shared by the runs, which saw the same items) and, with several runs, runs resampled across seeds."""
    if not runs or not pairable(runs):
        raise ValueError("an interval needs runs evaluated on the same items")
    rng = np.random.default_rng(seed)
    means = _seed_means(_run_values(runs, rng, replicates), rng)
    return Interval(*_percentiles(means, level), level, how(len(runs)))


def compare(
    cell: Sequence[Items],
    base: Sequence[Items],
    *,
    baseline: str,
    seeds: tuple[Sequence[Any], Sequence[Any]] | None = None,
    replicates: int = DEFAULT_REPLICATES,
    level: float = LEVEL,
    seed: int = 0,
) -> Comparison:
    """Paired bootstrap of mean(cell) - mean(base) on the same items: each replicate draws one item sample for every
    run of both sides, and resamples runs; ``seeds`` (the seed of each run, per side) pairs the runs by seed when
    both sides have the same seeds (the same seed is the same data order and initial adapter), else each side's runs
    are resampled on their own. p: two-sided, the share of replicates on the other side of zero, doubled (the
    interval at ``level`` excludes zero exactly when p < 1 - level)."""
    runs = [*cell, *base]
    if not cell or not base or not pairable(runs):
        raise ValueError("a paired comparison needs both sides evaluated on the same items")
    rng = np.random.default_rng(seed)
    values = _run_values(runs, rng, replicates)
    ours, theirs = values[: len(cell)], values[len(cell) :]
    # pairing needs one run per seed on each side (a cell averaged over configurations repeats its seeds)
    mine, theirs_seeds = ([str(s) for s in side] for side in seeds) if seeds is not None else ([], [])
    paired = len(cell) > 1 and len(set(mine)) == len(mine) and sorted(mine) == sorted(theirs_seeds)
    if paired:
        order = [theirs_seeds.index(s) for s in mine]
        theirs = theirs[order]
        picks = rng.integers(0, len(cell), size=(replicates, len(cell)))
        diff = _seed_means(ours, rng, picks) - _seed_means(theirs, rng, picks)
    else:
        diff = _seed_means(ours, rng) - _seed_means(theirs, rng)
    low, high = _percentiles(diff, level)
    point = float(np.mean([r.point() for r in cell]) - np.mean([r.point() for r in base]))
    p = min(1.0, 2 * min(np.mean(diff <= 0), np.mean(diff >= 0)))
    return Comparison(baseline, point, low, high, float(p), level=level, replicates=replicates)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval, each end a replicate's value: low is the smallest value with at least a tail's share
    of replicates at or below it, high the largest with a tail's share at or above it. So the interval excludes zero
    exactly when fewer than a tail's share of replicates lie on zero's side, which is when p < 1 - level."""
    tail = (1 - level) / 2
    low = np.quantile(values, tail, method="inverted_cdf")
    high = -np.quantile(-values, tail, method="inverted_cdf")
    return float(low), float(high)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as ``ps``): the k-th smallest p times (m - k + 1), made
    monotone, capped at 1. Controls the family-wise error over one table's comparisons."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted = [0.0] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted
