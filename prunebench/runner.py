"""One job: model x method x keep x dataset -> predictions.jsonl + record.json in its own folder.

`run(cfg)` picks the job's evaluation backend (`prunebench/backends/`: the built-in suites or VLMEvalKit) and
runs it. The job's identity, folder, lock and skip / resume rule are `prunebench/jobs.py`; the timed
generation every backend uses is `prunebench/generation.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunebench.backends import backend_for
from prunebench.jobs import Interrupted, Job, JobLocked, job_key, writable_results_dir

__all__ = ["Interrupted", "Job", "JobLocked", "job_key", "run", "writable_results_dir"]


def run(cfg: Mapping[str, Any], *, quiet: bool = False, wait: bool | None = None) -> Path:
    """Run (or resume, or skip) one job; returns the record path. The job holds a lock on its folder while it
    runs (`wait`: wait for another process holding it instead of refusing; default the `wait` option)."""
    return backend_for(cfg).run(cfg, quiet, wait)
