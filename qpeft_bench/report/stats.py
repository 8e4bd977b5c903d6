"""Uncertainty of the report's quality cells: bootstrap intervals over the items a run was evaluated on (and over
the runs of a cell), paired bootstrap comparisons against a baseline on the same items, and Holm's correction over
a table's comparisons."""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def significant(self) -> bool:
        return self.p_holm is not None and self.p_holm < 1 - self.level
