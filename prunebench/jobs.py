"""One job's identity and life cycle, shared by every evaluation backend.

A job is model x method x keep x dataset (+ everything else that changes its numbers: `job_key`). Its folder is
a pure function of that key, so rerunning the same command finds it: a complete record of exactly this key is
reused (`reusable`), anything else runs; one process holds the folder's lock while it runs (`job_lock`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunebench.checks import check_options, check_params, plain, yaml_defaults
from prunebench.errors import UserError
from prunebench.methods import ResolvedMethod, Stage, resolve_method
from prunebench.methods.base import n_keep_for
from prunebench.models.loader import LoadedModel, decoder_layer_count, resident_model, resolve_device
from prunebench.record import LOCK_NAME, RunRecord, load_record, now, versions
from prunebench.stages import batch_refusal, planned_stages
from prunebench.stages.inputs import refusal as input_refusal
from prunebench.stages.llm import intra_layers_checked


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
        method = resolve_method(str(m["name"]), plain(m.get("params") or {}), m.get("positions"))
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
            values = plain(cfg[group])
            check_params(group, values, yaml_defaults(group, str(values.get("name"))))
        job = cls(model=model, dataset=str(cfg["dataset"]["name"]), method=method,
                  keep=keep, seed=int(cfg["seed"]), limit=None if limit is None else int(limit),
                  key=job_key(cfg, method, keep))
        check_input_stage_before_loading(job, cfg)
        return job

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
_NOT_IN_KEY = {"results_dir", "report", "baseline", "wait", "hydra", "grid"}  # grid: which jobs, not how


def job_key(cfg: Mapping[str, Any], method: ResolvedMethod, keep: float) -> dict[str, Any]:
    """Everything that can change a job's result: the resolved model and dataset configs, the method with its
    full parameters and position policy, the exact keep (repr, not rounded), seed, limit, batch size, device,
    threads and warm-up. Two jobs share a folder and a record only when these are equal."""
    values = plain(cfg)
    key = {k: v for k, v in values.items() if k not in _NOT_IN_KEY and k not in ("method", "keep")}
    key["method"] = {"name": method.name, "params": dict(method.params), "positions": method.positions.value}
    key["keep"] = repr(float(keep))
    key["device"] = resolve_device(str(values.get("device", "auto"))).type  # auto: the machine's, cpu or cuda
    if key.get("model", {}).get("weights") == "random":  # how the random weights are drawn (loader's default)
        key["model"].setdefault("random_init", "tiled")
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def compose_job(options: Mapping[str, Any]) -> Any:
    """prunebench's composed config from named options and dotted overrides, for an evaluator's own entry point
    (lmms-eval `--model_args`, a VLMEvalKit model config): `model`, `method`, `keep`, ... as on the command line."""
    from hydra import compose, initialize_config_dir

    from prunebench.checks import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[f"{k}={v}" for k, v in options.items()])


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
        say(False, f"[prunebench] warning: unreadable {record_path} ({reason}); the job resumes from its predictions")
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


def say(quiet: bool, line: str) -> None:
    if not quiet:
        print(line, file=sys.stderr)


def new_record(job: Job, cfg: Mapping[str, Any], loaded: LoadedModel) -> RunRecord:
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


def check_input_stage_before_loading(job: Job, cfg: Mapping[str, Any]) -> None:
    """An input-stage method (`method=downsample`) on a family with no resolution to lower (LLaVA-1.5), or one
    setting per processor call on a batch (InternVL's tile budget): one line before the weights load."""
    if job.method.stage is not Stage.INPUT:
        return
    from prunebench.families import FAMILIES

    family = str(cfg["model"].get("family", "llava"))
    entry = FAMILIES.get(family)
    why = input_refusal(family, entry.input_knob, job.method)
    if why is None and job.keep < 1.0 and int(cfg.get("batch_size", 1)) > 1 and entry.input_per_call:
        why = (f"batch_size={cfg['batch_size']}: {job.method.name} on {family} sets a processor-call argument, one "
               f"value per call; use batch_size=1")
    if why is not None:
        raise UserError(why)


def model_for_job(job: Job, cfg: Mapping[str, Any], quiet: bool = False) -> LoadedModel:
    """The job's model on its device, for every backend and entry point: its intra-LLM layers checked against the
    model's config first (one line, nothing loaded), CPU threads set as every job times, then the model this
    process already holds for the same config, else loaded now (said once)."""
    check_layers_before_loading(job, cfg["model"])
    device = resolve_device(str(cfg["device"]))
    if device.type == "cpu" and cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg["cpu_threads"]))
    start = time.perf_counter()
    loaded, reused = resident_model(cfg["model"], device)
    if not reused:
        say(quiet, f"[prunebench] loaded model {loaded.name} on {device.type} in {time.perf_counter() - start:.1f} s"
                   f" (kept for the next job of this process)")
    return loaded
