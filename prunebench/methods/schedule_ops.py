"""Budget schedules of multi-layer intra-LLM methods: read keep as a layer-averaged visual count and
solve a schedule's one free scalar for it (PyramidDrop's lambda, SparseVLM's table scale)."""

from __future__ import annotations

from collections.abc import Callable


def closest_step(avg: Callable[[float], float], target: float, lo: float, hi: float, steps: int = 60) -> float:
    """The x in [lo, hi] whose avg(x) is closest to target, for a non-decreasing step function avg
    (ties: the larger x). Bisects for the step that crosses the target, then takes the closer side."""
    if avg(hi) <= target:
        return hi
    if avg(lo) >= target:
        return lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        if avg(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi if abs(avg(hi) - target) <= abs(avg(lo) - target) else lo
