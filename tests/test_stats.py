"""prunebench.stats: the paired bootstrap against a brute-force loop and an exact enumeration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from prunebench import stats


def brute_force(a: list[float], b: list[float], n_resamples: int, seed: int) -> tuple[float, float, float]:
    """One resample at a time from the same generator, the mean by hand, the percentile by its definition
    (linear interpolation between the order statistics at rank q * (R - 1))."""
    n, rng = len(a), np.random.default_rng(seed)
    means = []
    for _ in range(n_resamples):
        picks = rng.integers(0, n, size=n)
        means.append(sum(a[i] - b[i] for i in picks) / n)
    means.sort()

    def percentile(q: float) -> float:
        rank = q * (n_resamples - 1)
        lo = int(rank)
        hi = min(lo + 1, n_resamples - 1)
        return means[lo] + (means[hi] - means[lo]) * (rank - lo)

    return sum(x - y for x, y in zip(a, b, strict=True)) / n, percentile(0.025), percentile(0.975)


def correctness(n: int, p: float, seed: int) -> list[float]:
    return [float(x) for x in np.random.default_rng(seed).random(n) < p]


@pytest.mark.parametrize("block", [stats.BLOCK, 7 * 40])  # one block, and blocks of 7 resamples
def test_paired_bootstrap_equals_a_brute_force_loop(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    a, b = correctness(40, 0.7, 1), correctness(40, 0.5, 2)
    monkeypatch.setattr(stats, "BLOCK", block)
    got = stats.paired_bootstrap(a, b, n_resamples=300, seed=5)
    assert got == pytest.approx(brute_force(a, b, 300, 5), abs=1e-12)
    assert got[1] < got[0] < got[2]


def test_paired_bootstrap_matches_the_exact_bootstrap_distribution() -> None:
    """Differences (0, 1, 1): the 27 equally likely resamples give a mean of 0 with probability 1/27 (3.7%) and
    of 1 with 8/27 (29.6%), so the exact 2.5th / 97.5th percentiles are 0 and 1; with 20,000 resamples the
    positions around rank 500 and 19,500 fall well inside those masses."""
    exact = sorted(sum(picks) / 3 for picks in itertools.product([0.0, 1.0, 1.0], repeat=3))
    assert exact.count(0.0) == 1 and exact.count(1.0) == 8
    diff, low, high = stats.paired_bootstrap([1.0, 1.0, 1.0], [1.0, 0.0, 0.0], n_resamples=20_000, seed=0)
    assert (diff, low, high) == (pytest.approx(2 / 3), 0.0, 1.0)


def test_paired_bootstrap_is_fixed_by_its_seed() -> None:
    a, b = correctness(100, 0.6, 3), correctness(100, 0.6, 4)
    assert stats.paired_bootstrap(a, b, 500, seed=1) == stats.paired_bootstrap(a, b, 500, seed=1)
    assert stats.paired_bootstrap(a, b, 500, seed=1) != stats.paired_bootstrap(a, b, 500, seed=2)


def test_identical_runs_have_a_zero_width_interval_and_a_clear_gap_excludes_zero() -> None:
    a = correctness(200, 0.5, 0)
    assert stats.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    diff, low, high = stats.paired_bootstrap([1.0] * 200, a)
    assert 0 < low < diff < high


@pytest.mark.parametrize("a, b, n", [([], [], 10), ([1.0], [1.0, 0.0], 10), ([1.0], [0.0], 0)])
def test_paired_bootstrap_rejects_bad_input(a: list[float], b: list[float], n: int) -> None:
    with pytest.raises(ValueError):
        stats.paired_bootstrap(a, b, n)
