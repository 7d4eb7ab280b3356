"""Evaluation backends: where a job's items come from, how they are answered, and how they are scored.

    builtin    prunebench's own suites: probe, shapes, shapes_video (`backends/builtin.py`)
    vlmeval    VLMEvalKit's benchmarks, optional, in its own venv (`prunebench/bridge/`)
    lmms_eval  lmms-eval's tasks, optional, in its own venv (`backends/lmms_eval.py`, `prunebench/lmms/`)

A job's backend follows from its dataset config (`dataset.kind`: `vlmeval` for VLMEvalKit's, else built-in), or
from `backend=<name>`, which must be one that runs that kind (`lmms_eval` for `dataset.kind: lmms_eval`). Every backend shares the job's identity, lock and
skip / resume rule (`prunebench/jobs.py`), generates through `prunebench/generation.py`, and fills one
`RunRecord` (`prunebench/record.py`). Adding a backend: a module here with its `run`, registered below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunebench.errors import UserError
from prunebench.registry import Registry


@dataclass(frozen=True)
class Backend:
    name: str
    kinds: Callable[[str], bool]  # the dataset kinds it runs
    run: Callable[[Mapping[str, Any], bool, bool | None], Path]  # (cfg, quiet, wait) -> the record's path
    batch_refusal: str | None = None  # why it runs one sample at a time, or None when batch_size=N works
    what: str = ""
    check: Callable[[Mapping[str, Any]], None] | None = None  # every value of a job, before any model loads


def _check_job(cfg: Mapping[str, Any]) -> None:
    from prunebench.jobs import Job

    Job.from_config(cfg)


def _own_inputs(backend: str) -> Callable[[Mapping[str, Any]], None]:
    """A backend that builds its own inputs refuses an input-stage method (`method=downsample`) before the
    baseline runs (lmms-eval: after the job's own checks)."""

    def check(cfg: Mapping[str, Any]) -> None:
        from prunebench.checks import plain
        from prunebench.methods import resolve_method
        from prunebench.stages.inputs import refuse_outside_builtin

        if backend == "lmms-eval":
            _check_job(cfg)
        method = cfg["method"]
        refuse_outside_builtin(resolve_method(str(method["name"]), plain(method.get("params") or {})), backend)

    return check


def _builtin(cfg: Mapping[str, Any], quiet: bool, wait: bool | None) -> Path:
    from prunebench.backends.builtin import run_builtin
    from prunebench.jobs import Job, job_lock, writable_results_dir

    job = Job.from_config(cfg)
    out = job.directory(writable_results_dir(cfg["results_dir"]))
    with job_lock(out, bool(cfg.get("wait", False)) if wait is None else wait):
        return run_builtin(job, cfg, out, quiet)


def _vlmeval(cfg: Mapping[str, Any], quiet: bool, wait: bool | None) -> Path:
    from prunebench.bridge.run import run_vlmeval  # imports VLMEvalKit only now (optional)

    return run_vlmeval(cfg, quiet=quiet)


def _lmms_eval(cfg: Mapping[str, Any], quiet: bool, wait: bool | None) -> Path:
    from prunebench.backends.lmms_eval import run_lmms_eval  # imports lmms-eval only now (optional)

    return run_lmms_eval(cfg, quiet, wait)


BACKENDS: Registry[Backend] = Registry("backend")
BACKENDS.add("builtin", Backend("builtin", lambda kind: kind not in ("vlmeval", "lmms_eval"), _builtin,
                                what="prunebench's own suites (probe, shapes, shapes_video)", check=_check_job))
BACKENDS.add("vlmeval", Backend("vlmeval", lambda kind: kind == "vlmeval", _vlmeval,
                                batch_refusal="the VLMEvalKit backend asks the model one sample at a time",
                                what="VLMEvalKit's benchmarks (optional, README 'VLMEvalKit backend')",
                                check=_own_inputs("VLMEvalKit")))
BACKENDS.add("lmms_eval", Backend("lmms_eval", lambda kind: kind == "lmms_eval", _lmms_eval,
                                  batch_refusal="the lmms-eval backend answers one request at a time",
                                  what="lmms-eval tasks (optional, README 'lmms-eval')",
                                  check=_own_inputs("lmms-eval")))


def backend_for(cfg: Mapping[str, Any]) -> Backend:
    """The job's backend: `backend=<name>` when set, else the one that runs the dataset's kind; one line when
    the two disagree or the batch size is one the backend cannot run."""
    kind = str(cfg["dataset"].get("kind"))
    asked = cfg.get("backend")
    if asked in (None, "auto"):
        backend = next(BACKENDS.get(n) for n in BACKENDS if BACKENDS.get(n).kinds(kind))
    else:
        backend = BACKENDS.get(str(asked))
        if not backend.kinds(kind):
            valid = ", ".join(n for n in BACKENDS if BACKENDS.get(n).kinds(kind))
            raise UserError(f"backend={asked} does not run dataset '{cfg['dataset'].get('name')}' (kind {kind}); "
                            f"valid backends for it: {valid}")
    if int(cfg.get("batch_size", 1)) != 1 and backend.batch_refusal is not None:
        raise UserError(f"batch_size={cfg['batch_size']}: {backend.batch_refusal}; use batch_size=1")
    return backend
