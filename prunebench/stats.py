"""Statistics on per-sample results: pure functions on sequences, no records or files.

`paired_bootstrap` is the paired (item-level) bootstrap of a mean difference with a percentile interval
(Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, §13.3): both runs answered the same items, so
items are resampled together and the spread between items (some are hard for every method) cancels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
BLOCK = 1 << 20  # resample indices drawn per block (items x resamples), so memory stays flat on large sets


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_resamples: int = RESAMPLES,
                     seed: int = SEED) -> tuple[float, float, float]:
    """(mean(a - b), low, high): the mean paired difference and its 95% percentile interval.

    a, b: [N] per-item values of two runs on the same N items, in the same order (e.g. correctness 0/1).
    Each resample draws N item positions with replacement, `np.random.default_rng(seed).integers(0, N, N)`,
    one resample after another; low / high are the 2.5th / 97.5th percentiles (numpy's linear
    interpolation) of the resampled mean differences.
    """
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty sequences; got {len(a)} and "
                         f"{len(b)} values")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    means = resampled_means(diff, n_resamples, seed)
    tail = (1.0 - LEVEL) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), float(low), float(high)


def resampled_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples] means of `values` ([N]) over bootstrap resamples, drawn in blocks of whole resamples
    (numpy's generator gives the same indices in blocks as one resample at a time)."""
    n = len(values)
    rng = np.random.default_rng(seed)
    per_block = max(1, BLOCK // n)
    means = [values[rng.integers(0, n, size=(min(per_block, n_resamples - start), n))].mean(axis=1)
             for start in range(0, n_resamples, per_block)]
    return np.concatenate(means)
