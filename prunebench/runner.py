"""One job: model x method x keep x dataset -> predictions.jsonl + record.json in its own folder.

The job folder is a pure function of what defines the result, so rerunning the same command
finds it: a complete record is skipped, a partial predictions file is resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from prunebench.checks import check_options, check_params, yaml_defaults
from prunebench.data.datasets import Dataset, Item, build_dataset
from prunebench.errors import UserError
from prunebench.flops import count_flops, flops_summary
from prunebench.measure import instrument, kv_cache_bytes, prefill_cache_bytes
from prunebench.methods import ResolvedMethod, Stage, resolve_method
from prunebench.methods.base import n_keep_for
from prunebench.models.loader import LoadedModel, decoder_layer_count, load_model, resolve_device
from prunebench.record import (
    LOCK_NAME,
    PREDICTIONS_NAME,
    RECORD_NAME,
    RunRecord,
    load_record,
    memory_summary,
    now,
    paired_summary,
    read_jsonl,
    save_record,
    timing_summary,
    versions,
)
from prunebench.stages import Installation, batch_refusal, install, planned_stages
from prunebench.stages.llm import intra_layers_checked
from prunebench.timing import Timer


@dataclass(frozen=True)
class Job:
    model: str
    dataset: str
    method: ResolvedMethod
    keep: float
    seed: int
    limit: int | None
    key: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Job:
        check_options(cfg)  # every value typed and in range before anything loads
        m = cfg["method"]
        method = resolve_method(str(m["name"]), _plain(m.get("params") or {}), m.get("positions"))
        keep = float(cfg["keep"])
        n_keep_for(keep, 1)  # validates the range with a clear message
        if method.stage is Stage.NONE:
            keep = 1.0
        planned_stages(method, keep)  # a pipeline's stages and keeps, checked before any model loads
        limit = cfg.get("limit")
        if limit is not None and int(limit) < 1:
            raise UserError(f"limit must be a positive number of samples, got {limit}")
        if int(cfg.get("batch_size", 1)) > 1:
            refusal = batch_refusal(method)
            if refusal is not None:
                raise UserError(f"batch_size={cfg['batch_size']}: {refusal}; use batch_size=1")
        model = str(cfg["model"]["name"])
        if cfg["model"].get("weights") == "random":
            model += "-random"  # never mixed with (or resumed from) pretrained runs
        for group in ("dataset", "model"):
            values = _plain(cfg[group])
            check_params(group, values, yaml_defaults(group, str(values.get("name"))))
        return cls(model=model, dataset=str(cfg["dataset"]["name"]), method=method,
                   keep=keep, seed=int(cfg["seed"]), limit=None if limit is None else int(limit),
                   key=job_key(cfg, method, keep))

    @property
    def key_hash(self) -> str:
        return hashlib.sha1(json.dumps(self.key, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def directory(self, results_dir: Path) -> Path:
        """results/<model>/<dataset>[-nLIMIT]/<method>[-<params hash>]/keep<k>-seed<s>-<key hash>."""
        data = self.dataset + (f"-n{self.limit}" if self.limit else "")
        method = self.method.name
        official = self.method.spec.default_positions(self.method.params)
        if dict(self.method.params) != dict(self.method.spec.defaults) or self.method.positions != official:
            blob = json.dumps({"p": dict(self.method.params), "pos": self.method.positions.value}, sort_keys=True)
            method += "-" + hashlib.sha1(blob.encode()).hexdigest()[:8]
        return results_dir / self.model / data / method / f"keep{self.keep:.3f}-seed{self.seed}-{self.key_hash}"


# Options that change how a job runs but not what it measures (its numbers' meaning): not in the key.
_NOT_IN_KEY = {"results_dir", "report", "baseline", "wait", "hydra"}


def job_key(cfg: Mapping[str, Any], method: ResolvedMethod, keep: float) -> dict[str, Any]:
    """Everything that can change a job's result: the resolved model and dataset configs, the method with its
    full parameters and position policy, the exact keep (repr, not rounded), seed, limit, batch size, device,
    threads and warm-up. Two jobs share a folder and a record only when these are equal."""
    plain = _plain(cfg)
    key = {k: v for k, v in plain.items() if k not in _NOT_IN_KEY and k not in ("method", "keep")}
    key["method"] = {"name": method.name, "params": dict(method.params), "positions": method.positions.value}
    key["keep"] = repr(float(keep))
    key["device"] = resolve_device(str(plain.get("device", "auto"))).type  # auto: the machine's, cpu or cuda
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _plain(params: Any) -> dict[str, Any]:
    """Hydra/OmegaConf containers -> plain dicts and lists (pipelines nest them; the record is JSON)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig | ListConfig) \
        else dict(params)


def run(cfg: Mapping[str, Any], *, quiet: bool = False, wait: bool | None = None) -> Path:
    """Run (or resume, or skip) one job; returns the record path. The job holds a lock on its folder while it
    runs (`wait`: wait for another process holding it instead of refusing; default the `wait` option)."""
    if cfg["dataset"].get("kind") == "vlmeval":  # the optional VLMEvalKit backend
        if int(cfg.get("batch_size", 1)) != 1:
            raise UserError(f"batch_size={cfg['batch_size']}: the VLMEvalKit backend asks the model one sample at "
                            f"a time; use batch_size=1")
        from prunebench.bridge.run import run_vlmeval

        return run_vlmeval(cfg, quiet=quiet)
    job = Job.from_config(cfg)
    out = job.directory(writable_results_dir(cfg["results_dir"]))
    with job_lock(out, bool(cfg.get("wait", False)) if wait is None else wait):
        return _run_locked(job, cfg, out, quiet)


def _run_locked(job: Job, cfg: Mapping[str, Any], out: Path, quiet: bool) -> Path:
    record_path = out / RECORD_NAME
    if reusable(record_path, job):
        _say(quiet, f"[prunebench] complete, skipped: {record_path}")
        return record_path
    dataset = build_dataset(cfg["dataset"])
    device = resolve_device(str(cfg["device"]))
    check_layers_before_loading(job, cfg["model"])
    if device.type == "cpu" and cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg["cpu_threads"]))
    loaded = load_model(cfg["model"], device)
    items = dataset.items()[: job.limit] if job.limit else dataset.items()
    record = _new_record(job, cfg, loaded)
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
        _say(False, f"[prunebench] warning: {flag}")
    if inst.schedule is not None:  # dynamic-resolution families: per sample in the predictions
        record.tokens["vision_merge_schedule"] = list(inst.schedule)
    if inst.stages:  # pipelines: every stage's method, params, keep (method_card) and counts (tokens)
        record.method_card["stages"] = [stage.describe() for stage in inst.stages]
    save_record(out, record)
    if record.n_failed:
        _say(False, f"[prunebench] warning: {record.n_failed} of {len(rows)} samples failed; see {out / PREDICTIONS_NAME}")
    return record_path


def check_layers_before_loading(job: Job, model_cfg: Mapping[str, Any]) -> None:
    """An intra-LLM stage's layers against the LLM's layer count read from the model's config, so a layer out of
    range is one line before the weights load (and leaves no record)."""
    n_layers = decoder_layer_count(model_cfg)
    if n_layers is None:
        return
    for stage in planned_stages(job.method, job.keep):
        if stage.method.stage is Stage.INTRA_LLM:
            intra_layers_checked(stage.method, stage.keep, n_layers)


def writable_results_dir(value: Any) -> Path:
    """`results_dir` as a folder this process can write in (created if missing), or one line saying why not."""
    root = Path(str(value)).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"results_dir={value} is not a directory (a file is in the way)") from None
    except OSError as err:
        raise UserError(f"results_dir={value} cannot be created: {err.strerror}") from None
    if not root.is_dir():
        raise UserError(f"results_dir={value} is not a directory")
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"results_dir={value} is not writable by this user")
    return root


def reusable(record_path: Path, job: Job) -> bool:
    """A complete, failure-free record of exactly this job (its stored key equals the job's). An unreadable
    record is a warning: the job counts as incomplete and resumes from its predictions."""
    if not record_path.exists():
        return False
    try:
        done = load_record(record_path)
    except (OSError, ValueError, TypeError) as err:
        reason = " ".join(str(err).split())[:200]
        _say(False, f"[prunebench] warning: unreadable {record_path} ({reason}); the job resumes from its predictions")
        return False
    return done.status == "complete" and done.n_failed == 0 and done.key == dict(job.key)


class JobLocked(UserError):
    """Another live process runs this job."""


@contextmanager
def job_lock(out: Path, wait: bool) -> Iterator[None]:
    """An exclusive lock on the job folder (`.lock`, holding the owner's PID). The OS releases it when the
    owner dies, so a lock file left by a dead process is simply taken over."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with (out / LOCK_NAME).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "?"
            raise JobLocked(f"job {out} is being run by PID {pid}; wait=true waits for it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job: `message` says what is saved and that rerunning resumes."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _say(quiet: bool, line: str) -> None:
    if not quiet:
        print(line, file=sys.stderr)


def _new_record(job: Job, cfg: Mapping[str, Any], loaded: LoadedModel) -> RunRecord:
    from omegaconf import DictConfig, OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    record = RunRecord(
        model=job.model, dataset=job.dataset, method=job.method.name, method_params=dict(job.method.params),
        stage=job.method.stage.value, positions=job.method.positions.value, keep=job.keep, seed=job.seed,
        limit=job.limit, method_card=job.method.describe(), config=resolved, versions=versions(),
        device=_device_info(loaded.device), started_at=now(), accuracy_meaningful=loaded.accuracy_meaningful,
        key=dict(job.key), batch_size=int(cfg.get("batch_size", 1)),
    )
    if loaded.weights == "random":
        record.notes.append("random weights (model.weights=random): accuracy is noise; use this run for latency only")
    elif loaded.untrained:
        record.notes.append(f"model '{loaded.name}' is untrained (random initialisation): accuracy is noise")
    return record


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


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["name"] = _cpu_name()
        info["torch_threads"] = torch.get_num_threads()
    return info


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_rows(path: Path) -> dict[int, dict[str, Any]]:
    """Last row per index; a torn last line (crash mid-write) is ignored."""
    return {int(row["index"]): row for row in read_jsonl(path)}


def _predict(job: Job, loaded: LoadedModel, dataset: Dataset, items: list[Item], path: Path,
             cfg: Mapping[str, Any], quiet: bool) -> tuple[list[dict[str, Any]], Installation]:
    rows = _read_rows(path)
    todo = [it for it in items if it.index not in rows or rows[it.index].get("error") is not None]
    if rows and todo:
        _say(quiet, f"[prunebench] resuming {path.parent}: {len(items) - len(todo)} of {len(items)} done")
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
        with path.open("a") as sink, tqdm(total=len(todo), desc=f"{job.method.name} keep={job.keep:g}",
                                          disable=quiet or None, leave=False, unit="sample") as bar:
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
    of every installation are gathered there."""

    def __init__(self, loaded: LoadedModel, job: Job, timer: Timer) -> None:
        self.loaded, self.job, self.timer = loaded, job, timer
        self.first: Installation | None = None
        self._cm: Any = None
        self._inst: Installation | None = None

    def on(self) -> Installation:
        if self._inst is None:
            cm = install(self.loaded.seams, self.job.method, self.job.keep, seed=self.job.seed, timer=self.timer)
            self._inst = cm.__enter__()  # a refusal raises here, with nothing installed
            self._cm = cm
            if self.first is None:
                self.first = self._inst
            else:
                self._inst.flags = self.first.flags  # one list: a later install's flags reach the record
        return self._inst

    def off(self) -> None:
        if self._cm is not None:
            cm, self._cm, self._inst = self._cm, None, None
            cm.__exit__(None, None, None)

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
    reseeds = [seed * 1_000_003 + item.index for item in batch]
    try:
        with install(loaded.seams, resolve_method("vanilla"), 1.0, seed=seed, timer=timer) as vanilla:
            out = generate_batch_timed(loaded, _inputs(loaded, batch), vanilla, timer, reseeds,
                                       dataset.max_new_tokens, flops=False)
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
    reseeds = [seed * 1_000_003 + item.index for item in batch]
    inputs = _inputs(loaded, batch)
    singles = [_inputs(loaded, [item]) for item in batch] if count and len(batch) > 1 else None
    outs = generate_batch_timed(loaded, inputs, inst, timer, reseeds, dataset.max_new_tokens,
                                flops=singles if singles is not None else count)
    return [(out.pop("text"), {**out, "n_frames": len(item.frames) if item.frames else 0})
            for out, item in zip(outs, batch, strict=True)]


def _inputs(loaded: LoadedModel, batch: list[Item]) -> Any:
    """The processor's tensors for a batch of samples (several: left-padded, as generation needs)."""
    processor = loaded.processor
    video = bool(batch[0].frames)
    visual = {"type": "video"} if video else {"type": "image"}
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [visual, {"type": "text", "text": item.question}]}], add_generation_prompt=True)
        for item in batch]
    if len(batch) == 1:  # exactly the single-sample call, no padding arguments
        media = {"videos": [list(batch[0].frames)]} if video else {"images": batch[0].image}
        inputs = processor(text=prompts[0], return_tensors="pt", **media)
    else:
        media = {"videos": [list(it.frames) for it in batch]} if video else {"images": [it.image for it in batch]}
        inputs = processor(text=prompts, return_tensors="pt", padding=True, padding_side="left", **media)
    if not any(k in inputs for k in ("pixel_values", "pixel_values_videos")):
        kind = "videos" if video else "images"
        raise UserError(f"the processor of model '{loaded.name}' produced no pixels for {kind} "
                        f"(its {kind[:-1]} processor is missing or unsupported here)")
    return inputs.to(loaded.device)


def generate_timed(loaded: LoadedModel, inputs: Any, inst: Installation, timer: Timer, reseed: int,
                   max_new_tokens: int, flops: bool = True) -> dict[str, Any]:
    """Greedy generation of one prepared sample under the installed method, with the stage timings.

    -> {"text", "timing", token counts, ...}: the per-sample fields of predictions.jsonl (shared by
    the built-in runner and the VLMEvalKit bridge, so both time exactly the same thing). `flops`: count the
    sample's FLOPs in a second, untimed pass (off for warm-up runs, whose rows are not kept).
    """
    return generate_batch_timed(loaded, inputs, inst, timer, [reseed], max_new_tokens, flops=flops)[0]


def generate_batch_timed(loaded: LoadedModel, inputs: Any, inst: Installation, timer: Timer, reseeds: list[int],
                         max_new_tokens: int, flops: bool | list[Any] = True) -> list[dict[str, Any]]:
    """Greedy generation of a prepared batch (B rows, left-padded when B > 1), one row dict per sample.

    Times are the batch's (what each of its samples waits for: `batch_size` says how many shared it); token
    counts are the row's own; KV bytes are the row's share of the batch's cache (1/B, padding included).
    `flops`: True counts the batch (B = 1) in a second untimed pass; a list of single-sample inputs counts each
    sample alone, so a sample's FLOPs do not depend on its batch; False counts nothing.
    """
    from transformers import GenerationConfig

    processor, model = loaded.processor, loaded.model
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(loaded.dtype)
    tok = processor.tokenizer
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           bos_token_id=tok.bos_token_id)
    b = inputs["input_ids"].shape[0]
    inst.reseed_rows(reseeds)
    cuda = loaded.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(loaded.device)
    timer.reset()
    with torch.inference_mode(), prefill_cache_bytes(model) as kv:
        timer.start("total")
        output = model.generate(**inputs, generation_config=gen)
        timer.stop("total")
    kv_prefill = [n // b for n in kv.get("prefill", [])]
    kv_end = [n // b for n in kv_cache_bytes(kv.get("cache"))]
    seconds, forwards = timer.seconds(), timer.spans("forward")
    decode_s = sum(forwards[1:])
    timing = {"total_s": seconds.get("total", 0.0), "vision_s": seconds.get("vision", 0.0),
              "method_s": seconds.get("method", 0.0), "prefill_s": forwards[0] if forwards else 0.0,
              "decode_s": decode_s, "ttft_s": timer.first_to_first("total", "forward"),
              "tpot_s": decode_s / (len(forwards) - 1) if len(forwards) > 1 else None}
    width = inputs["input_ids"].shape[1]
    real = inputs["attention_mask"].sum(dim=1).tolist() if "attention_mask" in inputs else [width] * b
    entry = inst.state.entry
    counts = inst.state.row_counts if len(inst.state.row_counts) == b else [inst.counts]
    peak = torch.cuda.max_memory_allocated(loaded.device) if cuda else None
    rows = []
    for row in range(b):
        new = _generated(output[row, width:], tok.eos_token_id)
        llm_len = int(real[row]) if entry is None else \
            int(entry.index.shape[1] - (0 if entry.pad is None else entry.pad[row].sum()))
        rows.append({
            "text": tok.decode(new, skip_special_tokens=True).strip(),
            "timing": dict(timing),
            "n_new_tokens": int(new.numel()),
            "prompt_len": int(real[row]),
            "llm_prompt_len": llm_len,
            **counts[row].as_dict(),
            **({"vision_merge_schedule": list(inst.schedule)} if inst.schedule is not None else {}),
            **({"stages": inst.stage_counts} if inst.stages else {}),
            "peak_gpu_bytes": peak,
            "kv_layer_bytes_prefill": kv_prefill, "kv_layer_bytes_end": kv_end,
            "batch_size": b,
        })
    if flops is True and b > 1:
        raise ValueError("a batch's FLOPs are counted per sample: pass its single-sample inputs")
    if flops is True:  # the same picks again, counted in a separate untimed pass
        inst.reseed_rows(reseeds)
        with torch.inference_mode():
            rows[0]["flops"] = count_flops(lambda: model.generate(**inputs, generation_config=gen), loaded.seams, timer)
    elif flops:  # each sample alone, at batch size 1
        for row, single, reseed in zip(rows, flops, reseeds, strict=True):
            for key in ("pixel_values", "pixel_values_videos"):
                if key in single:
                    single[key] = single[key].to(loaded.dtype)
            inst.reseed_rows([reseed])
            with torch.inference_mode():
                row["flops"] = count_flops(lambda single=single: model.generate(**single, generation_config=gen),
                                           loaded.seams, timer)
    return rows


def _generated(tokens: torch.Tensor, eos: int | list[int] | None) -> torch.Tensor:
    """A row's generated tokens up to and including its first end-of-sequence token (what follows is the
    padding a batch adds to rows that finished early)."""
    if eos is None:
        return tokens
    stops = torch.isin(tokens, torch.tensor(eos if isinstance(eos, list) else [eos], device=tokens.device))
    return tokens[: int(stops.nonzero()[0, 0]) + 1] if bool(stops.any()) else tokens


def _finish(record: RunRecord, rows: list[dict[str, Any]], dataset: Dataset, loaded: LoadedModel) -> None:
    ok = [r for r in rows if r.get("error") is None]
    record.n_samples, record.n_failed = len(rows), len(rows) - len(ok)
    if ok:
        scored = dataset.score(ok)
        record.score, record.metrics = scored.score, scored.metrics
        record.timing = timing_summary(ok, "cuda_events" if loaded.device.type == "cuda" else "perf_counter")
        record.timing["paired"] = paired_summary(ok)
        record.tokens = _tokens(ok)
        record.memory = memory_summary(ok)
        record.flops = flops_summary(ok)
    if any(r.get("clamped_to_one") for r in ok):
        record.notes.append("keep*N rounded to 0 visual tokens: 1 token was kept instead")
    record.status = "complete"
    record.finished_at = now()


def _tokens(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in rows)

    tokens = {"n_visual_in": mean("n_visual_in"), "n_visual_out": mean("n_visual_out"),
              "n_visual_fixed": mean("n_visual_fixed"), "layer_avg": mean("layer_avg"),
              "llm_prompt_len": mean("llm_prompt_len"), "prompt_len": mean("prompt_len")}
    if all(r.get("stages") for r in rows):  # pipelines: mean tokens in / out of each stage
        tokens["stages"] = [
            {"method": first["method"], "keep": first["keep"],
             **{k: statistics.fmean(r["stages"][i][k] or 0 for r in rows) for k in ("n_visual_in", "n_visual_out")}}
            for i, first in enumerate(rows[0]["stages"])]
    stages = [r.get("llm_schedule") for r in rows]
    if stages[0] and all(s and [k for k, _ in s] == [k for k, _ in stages[0]] for s in stages):
        # multi-layer intra-LLM: [layer K_s, mean visual tokens from K_s on] per stage
        tokens["llm_schedule"] = [[k, statistics.fmean(s[i][1] for s in stages)] for i, (k, _) in enumerate(stages[0])]
    if all(r.get("n_frames") for r in rows):  # video: frames x tokens per frame (newlines excluded)
        tokens["n_frames"] = mean("n_frames")
        tokens["per_frame_in"] = statistics.fmean((r["n_visual_in"] - r["n_visual_fixed"]) / r["n_frames"] for r in rows)
        tokens["per_frame_out"] = statistics.fmean((r["n_visual_out"] - r["n_visual_fixed"]) / r["n_frames"]
                                                   for r in rows)
    return tokens
