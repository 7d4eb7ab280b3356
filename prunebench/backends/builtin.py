"""The built-in backend: prunebench's own suites (`dataset.kind` probe, shapes, shapes_video), generated and
scored here. predictions.jsonl is appended sample by sample, so a crash loses nothing and the rerun resumes.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunebench.data.datasets import Dataset, Item, build_dataset
from prunebench.errors import UserError
from prunebench.flops import flops_summary
from prunebench.generation import batch_inputs, generate_batch_timed, sample_seed
from prunebench.jobs import (
    Interrupted,
    Job,
    model_for_job,
    new_record,
    reusable,
    say,
)
from prunebench.measure import instrument
from prunebench.methods import Stage, resolve_method
from prunebench.models.loader import LoadedModel
from prunebench.progress import progress
from prunebench.record import (
    PREDICTIONS_NAME,
    RECORD_NAME,
    RunRecord,
    memory_summary,
    now,
    paired_summary,
    read_jsonl,
    save_record,
    timing_summary,
    tokens_summary,
)
from prunebench.stages import Installation, install
from prunebench.timing import Timer


def run_builtin(job: Job, cfg: Mapping[str, Any], out: Path, quiet: bool) -> Path:
    record_path = out / RECORD_NAME
    if reusable(record_path, job):
        say(quiet, f"[prunebench] complete, skipped: {record_path}")
        return record_path
    dataset = build_dataset(cfg["dataset"])
    loaded = model_for_job(job, cfg, quiet)
    items = dataset.items()[: job.limit] if job.limit else dataset.items()
    record = new_record(job, cfg, loaded)
    record.floor = blind_floor(cfg["model"], cfg["dataset"], dataset)
    save_record(out, record)
    try:
        rows, inst = _predict(job, loaded, dataset, items, out / PREDICTIONS_NAME, cfg, quiet)
    except UserError as err:  # the method cannot run on this model: say so in the record, not "running"
        record.status = "refused"
        record.notes.append(f"refused: {err}")
        save_record(out, record)
        raise
    _finish(record, rows, dataset, loaded)
    record.positions = inst.positions.value
    record.method_card["positions"] = inst.positions.value
    record.notes += inst.notes
    record.flags = list(dict.fromkeys(getattr(inst, "flags", [])))
    for flag in record.flags:
        say(False, f"[prunebench] warning: {flag}")
    if inst.schedule is not None:  # dynamic-resolution families: per sample in the predictions
        record.tokens["vision_merge_schedule"] = list(inst.schedule)
    if inst.stages:  # pipelines: every stage's method, params, keep (method_card) and counts (tokens)
        record.method_card["stages"] = [stage.describe() for stage in inst.stages]
    save_record(out, record)
    if record.n_failed:
        say(False, f"[prunebench] warning: {record.n_failed} of {len(rows)} samples failed; see {out / PREDICTIONS_NAME}")
    return record_path


def blind_floor(model_cfg: Mapping[str, Any], dataset_cfg: Mapping[str, Any], dataset: Dataset) -> dict[str, Any]:
    """The model's shipped blind floor (`model.blind_floor`: a JSON file beside its checkpoint) for this
    dataset, restricted to the dataset's categories; {} when the model has none, when the weights are not
    the ones it was measured with (weights=random, or model.path pointing elsewhere), or when it was
    measured on another dataset (kind, seed and image size must match)."""
    from prunebench.models.loader import _local_path

    path = _local_path(model_cfg.get("blind_floor"))
    if path is None or not path.is_file() or model_cfg.get("weights") == "random" \
            or path.parent != _local_path(model_cfg.get("path")):
        return {}
    data = json.loads(path.read_text())
    same = {k: dataset_cfg.get(k) for k in ("kind", "seed", "image_size")} == data.get("dataset", {})
    per = data.get("metrics", {})
    wanted = [c for c in (getattr(dataset, "families", None) or per) if c in per]
    if not same or not wanted:
        return {}
    metrics = {c: float(per[c]) for c in wanted}
    return {"score": statistics.fmean(metrics.values()), "metrics": metrics,
            "source": f"{path.name}: {data.get('how', 'zero visual tokens')}"}


def _read_rows(path: Path) -> dict[int, dict[str, Any]]:
    """Last row per index; a torn last line (crash mid-write) is ignored."""
    return {int(row["index"]): row for row in read_jsonl(path)}


def _predict(job: Job, loaded: LoadedModel, dataset: Dataset, items: list[Item], path: Path,
             cfg: Mapping[str, Any], quiet: bool) -> tuple[list[dict[str, Any]], Installation]:
    rows = _read_rows(path)
    todo = [it for it in items if it.index not in rows or rows[it.index].get("error") is not None]
    if rows and todo:
        say(quiet, f"[prunebench] resuming {path.parent}: {len(items) - len(todo)} of {len(items)} done")
    timer = Timer(loaded.device)
    try:
        inst = _predict_all(job, loaded, dataset, items, todo, rows, path, timer, cfg, quiet)
    except KeyboardInterrupt:
        saved = sum(1 for it in items if it.index in rows and rows[it.index].get("error") is None)
        raise Interrupted(f"interrupted: {saved} of {len(items)} samples of {path.parent} are saved; "
                          f"rerun the same command to resume") from None
    return [rows[it.index] for it in items if it.index in rows], inst


def _predict_all(job: Job, loaded: LoadedModel, dataset: Dataset, items: list[Item], todo: list[Item],
                 rows: dict[int, dict[str, Any]], path: Path, timer: Timer, cfg: Mapping[str, Any],
                 quiet: bool) -> Installation:
    size = int(cfg.get("batch_size", 1))
    groups = batches(todo, size)
    controls = control_batches(len(groups), 0 if job.method.stage is Stage.NONE else
                               -(-int(cfg.get("control", 0)) // size))
    method = Reinstallable(loaded, job, timer)
    with instrument(loaded.model, loaded.seams, timer), method:
        first = method.on()  # installed (and checked on this model) even when nothing is left to run
        if todo:
            warm = items[: int(cfg.get("warmup", 1))]
            for batch in batches(warm, size):  # untimed warm-up, at the job's batch size
                _generate(loaded, dataset, batch, method.on(), timer, job.seed, count=False)
                if controls:
                    method.off()
                    _control(loaded, dataset, batch, timer, job.seed)
        truncate_torn_tail(path)
        with path.open("a") as sink, progress(len(todo), f"{job.method.name} keep={job.keep:g}", quiet) as bar:
            for at, batch in enumerate(groups):
                before = at in controls and controls.index(at) % 2 == 1  # alternate: vanilla first, then after
                control = None
                if before:
                    method.off()
                    control = _control(loaded, dataset, batch, timer, job.seed, "before")
                out = _sample(loaded, dataset, batch, method.on(), timer, job.seed)
                if at in controls and not before:
                    method.off()
                    control = _control(loaded, dataset, batch, timer, job.seed, "after")
                for item, row in zip(batch, out, strict=True):
                    if control is not None and row.get("error") is None:
                        row["control"] = control
                    sink.write(json.dumps(row) + "\n")
                    rows[item.index] = row
                sink.flush()
                bar.update(len(batch))
    return first


class Reinstallable:
    """The job's method on the model, taken off for a vanilla control and put back (`on()` installs it if it
    is off). `first` is the first installation (its notes, positions and schedule describe the job); the flags
    of every installation are gathered there, and all of them share one memo of FLOP counts (the same method,
    keep and seed: a sample shaped like a counted one costs the same, whichever installation ran it)."""

    def __init__(self, loaded: LoadedModel, job: Job, timer: Timer) -> None:
        self.loaded, self.job, self.timer = loaded, job, timer
        self.first: Installation | None = None
        self._cm: Any = None
        self._inst: Installation | None = None
        self._counted: dict[str, dict[str, Any]] = {}

    def on(self) -> Installation:
        if self._inst is None:
            cm = install(self.loaded.seams, self.job.method, self.job.keep, seed=self.job.seed, timer=self.timer)
            self._inst = cm.__enter__()  # a refusal raises here, with nothing installed
            self._inst.flops_counted = self._counted
            self._cm = cm
            if self.first is None:
                self.first = self._inst
        return self._inst

    def off(self) -> None:
        if self._cm is not None:
            cm, inst, self._cm, self._inst = self._cm, self._inst, None, None
            cm.__exit__(None, None, None)
            if inst is not self.first:  # a later installation's flags (its stages hold its own list) reach the record
                self.first.flags.extend(f for f in inst.flags if f not in self.first.flags)

    def __enter__(self) -> Reinstallable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.off()


def control_batches(n_batches: int, n_controls: int) -> list[int]:
    """Positions of the batches that also run unpruned: n_controls of n_batches, spread evenly from the first."""
    n = min(n_batches, n_controls)
    return sorted({i * n_batches // n for i in range(n)}) if n else []


def _control(loaded: LoadedModel, dataset: Dataset, batch: list[Item], timer: Timer, seed: int,
             order: str = "warm-up") -> dict[str, Any] | None:
    """The batch again without the method (vanilla), timed exactly as the job's own samples: the paired
    control behind the record's speed ratios. None when it fails (the sample's own row is unaffected)."""
    reseeds = [sample_seed(seed, item.index) for item in batch]
    try:
        with install(loaded.seams, resolve_method("vanilla"), 1.0, seed=seed, timer=timer) as vanilla:
            out = generate_batch_timed(loaded, batch_inputs(loaded, batch, vanilla), vanilla, timer, reseeds,
                                       dataset.max_new_tokens)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - a control that fails is left out of the pairs
        return None
    return {"timing": out[0]["timing"], "order": order, "n_new_tokens": [r["n_new_tokens"] for r in out]}


def batches(items: list[Item], size: int) -> list[list[Item]]:
    """Consecutive groups of at most `size` samples; a group never mixes image and video samples."""
    out: list[list[Item]] = []
    for item in items:
        if out and len(out[-1]) < size and bool(out[-1][-1].frames) == bool(item.frames):
            out[-1].append(item)
        else:
            out.append([item])
    return out


def truncate_torn_tail(path: Path) -> None:
    """Cut a crash-torn last line (no newline) so the next append starts a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _sample(loaded: LoadedModel, dataset: Dataset, batch: list[Item], inst: Installation, timer: Timer,
            seed: int) -> list[dict[str, Any]]:
    """The prediction rows of one batch of samples. A batch that fails is retried one sample at a time, so a
    failing sample is recorded with its error and the others still run (their rows say batch_size 1)."""
    base = [{"index": it.index, "category": it.category, "question": it.question, "answer": it.answer}
            for it in batch]
    try:
        outs = _generate(loaded, dataset, batch, inst, timer, seed)
    except UserError:
        raise  # the whole job is wrong, not this sample
    except Exception as err:  # recorded with the sample; rerunning the command retries it
        if len(batch) > 1:
            return [row for item in batch for row in _sample(loaded, dataset, [item], inst, timer, seed)]
        base[0].update(error=f"{type(err).__name__}: {err}", prediction=None, correct=False)
        return base
    for row, item, (text, extra) in zip(base, batch, outs, strict=True):
        row.update(prediction=text, correct=dataset.is_correct(text, item), error=None, **extra)
        if len(batch) > 1:  # the rows of one batch share its timings (summed once in the record)
            row["batch_of"] = batch[0].index
    return base


def _generate(loaded: LoadedModel, dataset: Dataset, batch: list[Item], inst: Installation, timer: Timer,
              seed: int, count: bool = True) -> list[tuple[str, dict[str, Any]]]:
    reseeds = [sample_seed(seed, item.index) for item in batch]
    inputs = batch_inputs(loaded, batch, inst)
    singles = None if not count else [inputs] if len(batch) == 1 else [batch_inputs(loaded, [it], inst) for it in batch]
    outs = generate_batch_timed(loaded, inputs, inst, timer, reseeds, dataset.max_new_tokens, count=singles)
    return [(out.pop("text"), {**out, "n_frames": len(item.frames) if item.frames else 0})
            for out, item in zip(outs, batch, strict=True)]


def _finish(record: RunRecord, rows: list[dict[str, Any]], dataset: Dataset, loaded: LoadedModel) -> None:
    ok = [r for r in rows if r.get("error") is None]
    record.n_samples, record.n_failed = len(rows), len(rows) - len(ok)
    if ok:
        scored = dataset.score(ok)
        record.score, record.metrics = scored.score, scored.metrics
        record.timing = timing_summary(ok, "cuda_events" if loaded.device.type == "cuda" else "perf_counter")
        record.timing["paired"] = paired_summary(ok)
        record.tokens = tokens_summary(ok)
        record.memory = memory_summary(ok)
        record.flops = flops_summary(ok)
    if any(r.get("clamped_to_one") for r in ok):
        record.notes.append("keep*N rounded to 0 visual tokens: 1 token was kept instead")
    record.status = "complete"
    record.finished_at = now()
