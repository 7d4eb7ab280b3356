"""One progress display per job: tqdm's bar (samples/s, ETA) on a terminal; in logs and CI, where a bar would be
carriage-return noise, a line every tenth of the job (or every 30 s), with the same rate and ETA."""

from __future__ import annotations

import sys
import time
from typing import Any


class LogProgress:
    """`tqdm`'s `update` / context protocol, writing plain lines to stderr."""

    def __init__(self, total: int, desc: str, every_s: float = 30.0) -> None:
        self.total, self.desc, self.every_s = total, desc, every_s
        self.n, self.start = 0, time.perf_counter()
        self._next_n, self._last = max(total // 10, 1), self.start

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.n >= self._next_n or now - self._last >= self.every_s or self.n == self.total:
            rate = self.n / max(now - self.start, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            print(f"[prunebench] {self.desc}: {self.n}/{self.total} samples, {rate:.1f} samples/s, ETA {eta:.0f} s",
                  file=sys.stderr, flush=True)
            self._next_n = self.n + max(self.total // 10, 1)
            self._last = now

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class NoProgress(LogProgress):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress(total: int, desc: str, quiet: bool) -> Any:
    """The job's progress display (nothing when quiet)."""
    if quiet or not total:
        return NoProgress(total, desc)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, unit="sample")
    return LogProgress(total, desc)
