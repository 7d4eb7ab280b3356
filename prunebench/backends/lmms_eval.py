"""The lmms-eval backend (optional): a job's dataset is an lmms-eval task, run by lmms-eval's own evaluator on
the pruned model (`prunebench/lmms/model.py`), scored by the task's own metrics.

    python -m prunebench dataset=lmms_probe method=fastv keep=0.111        # the probe suite as an lmms-eval task
    python -m prunebench dataset=lmms_probe dataset.task=<lmms-eval task> dataset.include_path=<task dir>

Job identity, lock, skip and record are every backend's (`prunebench/jobs.py`); answers are flushed to
predictions.jsonl one by one, and a rerun answers only the missing ones (lmms-eval asks for all; the known
ones come from the file). lmms-eval is imported only here, after checking it is installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunebench.errors import UserError
from prunebench.jobs import (
    Job,
    job_lock,
    model_for_job,
    new_record,
    reusable,
    say,
    writable_results_dir,
)

INSTALL_HINT = ("the lmms-eval backend needs lmms-eval, the optional extra, in its own venv: make lmms-setup "
                "LMMS_VENV=../lmms-venv, then run ../lmms-venv/bin/python -m prunebench ... (README 'lmms-eval')")


def run_lmms_eval(cfg: Mapping[str, Any], quiet: bool, wait: bool | None) -> Path:
    if importlib.util.find_spec("lmms_eval") is None:
        raise UserError(INSTALL_HINT)
    job = Job.from_config(cfg)
    out = job.directory(writable_results_dir(cfg["results_dir"]))
    with job_lock(out, bool(cfg.get("wait", False)) if wait is None else wait):
        return _run(job, cfg, out, quiet)


def _run(job: Job, cfg: Mapping[str, Any], out: Path, quiet: bool) -> Path:

    from prunebench.flops import flops_summary
    from prunebench.measure import instrument
    from prunebench.record import (
        PREDICTIONS_NAME,
        RECORD_NAME,
        memory_summary,
        now,
        read_jsonl,
        save_record,
        timing_summary,
        tokens_summary,
    )
    from prunebench.stages import install
    from prunebench.timing import Timer

    record_path = out / RECORD_NAME
    if reusable(record_path, job):
        say(quiet, f"[prunebench] complete, skipped: {record_path}")
        return record_path
    dcfg = cfg["dataset"]
    task, include = str(dcfg["task"]), _task_folder(dcfg, out)
    loaded = model_for_job(job, cfg, quiet)
    record = new_record(job, cfg, loaded)
    save_record(out, record)
    sink = out / PREDICTIONS_NAME
    known = {r["key"]: r for r in read_jsonl(sink) if r.get("key")}
    timer = Timer(loaded.device)
    with instrument(loaded.model, loaded.seams, timer), \
            install(loaded.seams, job.method, job.keep, seed=job.seed, timer=timer) as inst:
        results = _evaluate(cfg, job, loaded, inst, timer, sink, known, task, include)
    rows = [r for r in read_jsonl(sink) if str(r.get("key", "")).startswith(f"{task}:")]
    rows = list({r["key"]: r for r in rows}.values())
    metric = str(dcfg.get("metric", "accuracy"))
    table = results["results"][task]
    if f"{metric},none" not in table:
        valid = ", ".join(k.split(",")[0] for k in table if k.endswith(",none"))
        raise UserError(f"task {task} has no metric '{metric}'; valid: {valid} (dataset.metric=)")
    record.score = float(table[f"{metric},none"])
    record.metrics = {k: float(v) for k, v in table.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    record.n_samples, record.n_failed = len(rows), 0
    record.timing = timing_summary(rows, "cuda_events" if loaded.device.type == "cuda" else "perf_counter")
    record.tokens, record.memory, record.flops = tokens_summary(rows), memory_summary(rows), flops_summary(rows)
    record.positions = inst.positions.value
    record.method_card["positions"] = inst.positions.value
    record.notes += inst.notes
    import lmms_eval

    record.benchmark = {"backend": "lmms_eval", "task": task, "metric": metric, "include_path": str(include),
                        "lmms_eval": getattr(lmms_eval, "__version__", None)}
    record.status, record.finished_at = "complete", now()
    save_record(out, record)
    return record_path


def _task_folder(dcfg: Mapping[str, Any], out: Path) -> Path | None:
    """Where the task's YAML is: dataset.include_path, or a built-in suite exported into the job folder."""
    if dcfg.get("include_path"):
        return Path(str(dcfg["include_path"])).expanduser()
    if dcfg.get("export"):
        from prunebench.jobs import plain
        from prunebench.lmms.task import export_suite

        suite = {k: v for k, v in plain(dcfg).items() if k in ("n", "seed", "image_size", "families", "max_new_tokens")}
        export_suite(out / "task", {"name": dcfg["export"], "kind": dcfg["export"], **suite}, str(dcfg["task"]))
        return out / "task"
    return None


def _evaluate(cfg: Mapping[str, Any], job: Job, loaded: Any, inst: Any, timer: Any, sink: Path,
              known: dict[str, Any], task: str, include: Path | None) -> dict[str, Any]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from prunebench.lmms.model import PrunebenchLMM

    lm = PrunebenchLMM.for_job(cfg, job, loaded, inst, timer, sink, known)
    manager = TaskManager("WARNING", include_path=None if include is None else str(include))
    if task not in manager.all_tasks:
        raise UserError(f"lmms-eval has no task '{task}'" + ("" if include is None else f" (also looked in {include})"))
    return simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=job.limit, batch_size=1,
                           log_samples=False, bootstrap_iters=0, verbosity="WARNING")
