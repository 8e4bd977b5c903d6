"""Golden tests of report/stats.py on synthetic items with a known answer: a planted difference is found, a zero
difference is found about as often as the level allows, intervals cover the planted value at about their rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qpeft_bench.report import stats

TRIALS = 1000  # synthetic data sets per rate; the rates' binomial sd is about 0.7 points at 5% and 95%
REPLICATES = 500


def scores(values, ids=None) -> stats.Items:
    values = np.asarray(values, dtype=np.float64)
    return stats.Items("scores", (values,), (1.0,), ids=(("t", tuple(ids or range(values.size))),))


def nll(sums, tokens) -> stats.Items:
    sums = np.asarray(sums, dtype=np.float64)
    return stats.Items("nll", (sums,), tokens=np.asarray(tokens, dtype=np.float64), ids=(tuple(range(sums.size)),))


def paired(rng: np.random.Generator, n: int, accuracy: float, redraw: float):
    """Baseline correctness on n items, and a configuration that agrees with it except on a `redraw` share of the
    items, drawn again at the same accuracy: no difference in expectation."""
    base = (rng.random(n) < accuracy).astype(float)
    cfg = base.copy()
    redo = rng.random(n) < redraw
    cfg[redo] = rng.random(int(redo.sum())) < accuracy
    return cfg, base


def planted(rng: np.random.Generator, n: int, accuracy: float, lost: int, gained: int):
    """A configuration exactly (gained - lost) / n better than its baseline: `lost` right items turned wrong and
    `gained` wrong ones turned right."""
    base = (rng.random(n) < accuracy).astype(float)
    cfg = base.copy()
    cfg[rng.choice(np.flatnonzero(base == 1), lost, replace=False)] = 0.0
    cfg[rng.choice(np.flatnonzero(base == 0), gained, replace=False)] = 1.0
    return cfg, base


def test_a_planted_two_point_gain_over_1000_items_is_significant() -> None:
    # two fine-tunings of one base agree on most items: 40 of 1000 differ, 30 in the configuration's favour
    for seed in range(5):
        cfg, base = planted(np.random.default_rng(seed), 1000, 0.6, lost=10, gained=30)
        c = stats.compare([scores(cfg)], [scores(base)], baseline="uniform", seed=seed)
        assert c.diff == pytest.approx(0.02)
        assert c.low > 0 and c.p < 0.05, c
        (adjusted,) = stats.holm([c.p])
        assert adjusted == c.p


def test_the_same_two_points_between_unrelated_runs_is_not_significant() -> None:
    # what pairing buys: on independent correctness (about half the items differ) 2 points is within the noise
    rng = np.random.default_rng(11)
    base = (rng.random(1000) < 0.6).astype(float)
    cfg = (rng.random(1000) < 0.6).astype(float)
    cfg[np.flatnonzero(cfg == 0)[: int(round((base.mean() + 0.02 - cfg.mean()) * 1000))]] = 1.0
    c = stats.compare([scores(cfg)], [scores(base)], baseline="u")
    assert c.diff == pytest.approx(0.02) and c.low < 0 < c.high and c.p > 0.05


def test_a_zero_difference_is_significant_about_five_percent_of_the_time() -> None:
    rejected = 0
    for trial in range(TRIALS):
        cfg, base = paired(np.random.default_rng(1000 + trial), 1000, 0.6, redraw=0.1)
        c = stats.compare([scores(cfg)], [scores(base)], baseline="u", replicates=REPLICATES, seed=trial)
        rejected += c.p < 0.05
        assert (c.p < 0.05) == (c.low > 0 or c.high < 0)  # the p-value and the interval agree
    print(f"false-positive rate at the 5% level: {rejected / TRIALS:.3f} of {TRIALS} data sets")  # pytest -s
    assert 0.03 <= rejected / TRIALS <= 0.07, rejected


@pytest.mark.parametrize("accuracy", [0.3, 0.6])
def test_accuracy_intervals_cover_the_planted_mean_at_their_rate(accuracy: float) -> None:
    covered = 0
    for trial in range(TRIALS):
        values = np.random.default_rng(2000 + trial).random(1000) < accuracy
        covered += stats.interval([scores(values)], replicates=REPLICATES, seed=trial).covers(accuracy)
    print(f"coverage of accuracy {accuracy}: {covered / TRIALS:.3f} of {TRIALS} data sets")
    assert 0.93 <= covered / TRIALS <= 0.97, covered


def test_perplexity_intervals_resample_windows_and_cover_the_planted_perplexity() -> None:
    # windows of 100 tokens with a summed NLL of mean 200 nats: the planted perplexity is exp(200 / 100)
    covered = 0
    for trial in range(TRIALS):
        sums = np.random.default_rng(3000 + trial).gamma(shape=50.0, scale=4.0, size=200)
        iv = stats.interval([nll(sums, np.full(200, 100))], replicates=REPLICATES, seed=trial)
        assert iv.low <= math.exp(sums.sum() / (100 * 200)) <= iv.high
        covered += iv.covers(math.exp(2.0))
    print(f"coverage of the planted perplexity: {covered / TRIALS:.3f} of {TRIALS} data sets")
    assert 0.93 <= covered / TRIALS <= 0.97, covered


def test_the_point_of_each_kind_is_the_records_number() -> None:
    assert nll([3.0, 5.0], [2, 2]).point() == pytest.approx(math.exp(2.0))
    # two leaves of one entry (a group: the unweighted mean over subjects), as the harness averages them
    items = stats.Items("scores", (np.array([1.0, 0.0]), np.array([1.0, 1.0, 1.0, 0.0])), (0.5, 0.5))
    assert items.point() == pytest.approx(0.5 * 0.5 + 0.5 * 0.75)


def test_seeds_widen_the_interval_when_they_disagree() -> None:
    rng = np.random.default_rng(7)
    base = rng.random(2000) < 0.5
    one = stats.interval([scores(base)], seed=1)
    # a second seed that is 10 points better on the same items: the cell's mean is uncertain by the seeds' spread
    better = base.copy()
    better[np.flatnonzero(~better)[:200]] = True
    two = stats.interval([scores(base), scores(better)], seed=1)
    assert (two.high - two.low) > 2 * (one.high - one.low)
    assert "2 runs resampled" in two.how and "1 run" in one.how


def test_runs_on_different_items_are_not_compared() -> None:
    a, b = scores([1, 0, 1]), scores([1, 0, 1], ids=[0, 1, 5])
    assert not stats.pairable([a, b])
    with pytest.raises(ValueError, match="same items"):
        stats.compare([a], [b], baseline="u")


def test_seed_pairing_follows_the_seeds_not_the_order() -> None:
    rng = np.random.default_rng(3)
    base0, base1 = (rng.random(500) < 0.5).astype(float), (rng.random(500) < 0.7).astype(float)
    # the configuration equals its baseline seed by seed; listed in the other order it must still be a zero
    c = stats.compare(
        [scores(base1), scores(base0)], [scores(base0), scores(base1)], baseline="u", seeds=([1, 0], [0, 1])
    )
    assert c.diff == 0 and c.low == 0 and c.high == 0 and c.p == 1
    # repeated seeds (a cell averaged over configurations) are not paired: each side's runs are resampled alone
    c = stats.compare(
        [scores(base1), scores(base1)], [scores(base0), scores(base1)], baseline="u", seeds=([0, 0], [0, 0])
    )
    assert c.high > c.low


def test_holm_matches_the_step_down_rule() -> None:
    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, 0.06 (monotone), 0.5
    assert stats.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []
