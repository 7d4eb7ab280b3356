"""Per-sample stage timing: CUDA events on GPU, perf_counter on CPU.

Marks are cheap and asynchronous on GPU (events are recorded on the stream, read once after
one synchronize at the end of the sample); nothing here prints or touches files.
A span name may open and close many times per sample (decode steps, per-layer merges): the
durations add up.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class Timer:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._count: Callable[[], float] | None = None
        self.reset()

    def reset(self) -> None:
        self._open: dict[str, object] = {}
        self._spans: dict[str, list[tuple[object, object]]] = defaultdict(list)

    @contextmanager
    def counting(self, count: Callable[[], float]) -> Iterator[None]:
        """Inside the block every mark reads `count()` instead of the clock (a FLOP counter's running
        total), so the same hooks measure FLOPs per span; marks before it are dropped, the clock comes back."""
        cuda, self.cuda, self._count = self.cuda, False, count
        self.reset()
        try:
            yield
        finally:
            self.cuda, self._count = cuda, None
            self.reset()

    def _now(self) -> object:
        if self._count is not None:
            return self._count()
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._open[name] = self._now()

    def stop(self, name: str) -> None:
        begin = self._open.pop(name, None)
        if begin is not None:
            self._spans[name].append((begin, self._now()))

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def seconds(self) -> dict[str, float]:
        """Sum of each span's durations in seconds (synchronizes once on GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1e3 for k, v in self._spans.items()}  # type: ignore[attr-defined]
        return {k: sum(b - a for a, b in v) for k, v in self._spans.items()}  # type: ignore[operator]

    def spans(self, name: str) -> list[float]:
        """Each duration of one span name, in seconds."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self._spans[name]]  # type: ignore[attr-defined]
        return [b - a for a, b in self._spans[name]]  # type: ignore[operator]


    def first_to_first(self, begin: str, end: str) -> float | None:
        """Seconds from the first opening of span `begin` to the first closing of span `end` (None when
        either never ran): from `generate` entry to the first token's logits is the time to first token."""
        if not self._spans.get(begin) or not self._spans.get(end):
            return None
        a, b = self._spans[begin][0][0], self._spans[end][0][1]
        if self.cuda:
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1e3  # type: ignore[attr-defined]
        return b - a  # type: ignore[operator]


class NullTimer(Timer):
    """A timer that records nothing (for `install` used outside the runner)."""

    def start(self, name: str) -> None:
        return None

    def stop(self, name: str) -> None:
        return None
