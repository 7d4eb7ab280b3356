"""The run record: one `record.json` per job, schema versioned here, written atomically.

Fields (schema_version 1):
  schema_version, status ("running" | "complete" | "refused": the method cannot run on this model, see notes), model, dataset, method, method_params, stage,
  positions, keep, seed, limit, batch_size (prompts per forward), n_samples, n_failed,
  score            main metric, 0-100 (the dataset says which), None if nothing scored
  metrics          per category, 0-100
  accuracy_meaningful  False for random or untrained weights: the score is noise
  notes            plain-language caveats (untrained weights, clamped budget, ...)
  tokens           n_visual_in / n_visual_out (means per sample), layer_avg, clamped_to_one,
                   llm_prompt_len (mean tokens entering the LLM), vision_merge_schedule (merges per
                   encoder layer, vision-stage methods), n_visual_fixed (kept outside the budget,
                   e.g. LLaVA-NeXT newlines); videos: n_frames, per_frame_in, per_frame_out;
                   pipelines (method=compose): stages, per stage {method, keep, n_visual_in, n_visual_out}
                   (means; optional, absent for single-stage methods)
                   intra-LLM: llm_schedule ([layer K_s, mean visual tokens from K_s on] per stage)
  timing           total_s, vision_s, method_s, prefill_s, decode_s: sums over samples;
                   median: the same per sample, medians, and ttft_s (generate entry -> first token's
                   logits) and tpot_s (decode_s per decode step) medians; n_new_tokens (sum) and
                   median_new_tokens; n_timed, warmup (samples run untimed first);
                   clock ("cuda_events" | "perf_counter")
  flops            means per sample, FlopCounterMode in a separate untimed pass (prunebench/flops.py): total,
                   vision, method, llm_prefill (the first decoder-stack call), decode; analytic_llm_prefill
                   (FastV's count at each layer's real length); n_counted ({} in older records)
  memory           peak_gpu_bytes (max over samples) or None on CPU; kv_bytes_prefill / kv_bytes_end: the
                   key/value bytes the cache object holds after the prefill forward and when generate
                   returns (means per sample, summed over layers), kv_layer_bytes_prefill / _end per layer
  predictions      file name of the per-sample predictions (JSON lines) beside the record
  method_card      stage, params, position policy, source, stated deviations; pipelines also
                   stages (each stage's card plus its keep)
  benchmark        VLMEvalKit runs only: backend, vlmeval_dataset (a subset's custom name), scored_as,
                   model_name, score_mapping (dataset YAML), judge, world_size; `metrics` then holds
                   VLMEvalKit's whole score table flattened to {"<split>|<column>": value}
  floor            the model's blind floor on this dataset, where the model ships one (model.blind_floor):
                   {score, metrics (per category), source}: accuracy with zero visual tokens, so a
                   category counts as measured only when vanilla is far above it; {} otherwise
  device, versions (python, torch, transformers, prunebench, git_sha), config (resolved)
  started_at, finished_at
  key              the job's identity (runner.job_key): everything that can change its result; its hash names
                   the folder and a complete record is reused only for an equal key ({} in older records)
  flags            warnings that change how a number reads, e.g. "budget unreachable: ..." (the method could not
                   reach the requested budget at its configured layers); the report marks flagged runs
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"
PREDICTIONS_NAME = "predictions.jsonl"
LOCK_NAME = ".lock"
TIMED_FIELDS = ("total_s", "vision_s", "method_s", "prefill_s", "decode_s")
# Per-sample latencies summarised by their medians only (a sum of them means nothing): time to first token
# (generate entry -> first token's logits) and time per output token (decode_s / decode steps; null with one
# generated token)
LATENCY_FIELDS = ("ttft_s", "tpot_s")


@dataclass
class RunRecord:
    model: str
    dataset: str
    method: str
    method_params: dict[str, Any]
    stage: str
    positions: str
    keep: float
    seed: int
    limit: int | None
    batch_size: int = 1
    status: str = "running"
    schema_version: int = SCHEMA_VERSION
    n_samples: int = 0
    n_failed: int = 0
    score: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    accuracy_meaningful: bool = True
    notes: list[str] = field(default_factory=list)
    tokens: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    predictions: str = PREDICTIONS_NAME
    method_card: dict[str, Any] = field(default_factory=dict)
    benchmark: dict[str, Any] = field(default_factory=dict)
    floor: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    finished_at: str | None = None
    key: dict[str, Any] = field(default_factory=dict)
    flops: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"record schema_version {version} is not {SCHEMA_VERSION}")
        return cls(**data)


def timing_summary(rows: list[dict[str, Any]], clock: str) -> dict[str, Any]:
    """The record's `timing` from per-sample rows: sums and medians of the stage times, medians of the
    latencies, the generated-token count, and throughput (a field that older rows lack is summarised over the
    rest). Rows of one batch (`batch_of`: its first sample's index) share its times: a sum counts each batch
    once; a median runs over samples (each waited for its whole batch)."""
    def seen(values: list[Any]) -> list[float]:
        return [v for v in values if v is not None]

    once = list({r.get("batch_of", ("row", i)): r for i, r in enumerate(rows)}.values())
    times = {f: seen([r["timing"].get(f) for r in rows]) for f in (*TIMED_FIELDS, *LATENCY_FIELDS)}
    sums = {f: sum(v) for f in TIMED_FIELDS if (v := seen([r["timing"].get(f) for r in once]))}
    tokens = seen([r.get("n_new_tokens") for r in rows])
    total = sums.get("total_s")
    return {**sums,
            "median": {f: statistics.median(v) for f, v in times.items() if v},
            "n_timed": len(rows), "n_batches": len(once), "clock": clock,
            "n_new_tokens": sum(tokens), "median_new_tokens": statistics.median(tokens) if tokens else None,
            "samples_per_s": len(rows) / total if total else None,
            "tokens_per_s": sum(tokens) / total if total and tokens else None}


# Speed ratios from paired timing: vanilla's time / the method's, per field (> 1: the method is faster).
PAIRED_FIELDS = ("total_s", "prefill_s", "ttft_s", "vision_s")


def paired_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The record's `timing.paired`: medians over the batches that also ran unpruned in the same process
    (`control`, interleaved; the order alternates after / before) of vanilla time / method time. `total_s`'s
    ratio is the throughput ratio at the job's batch size. {} when no sample has a control."""
    once = list({r.get("batch_of", ("row", i)): r for i, r in enumerate(rows) if r.get("control")}.values())
    if not once:
        return {}
    ratios = {}
    for f in PAIRED_FIELDS:
        pairs = [r["control"]["timing"].get(f) / r["timing"][f] for r in once
                 if r["timing"].get(f) and r["control"]["timing"].get(f)]
        if pairs:
            ratios[f] = statistics.median(pairs)
    return {"n_pairs": len(once), "n_samples": sum(1 for r in rows if r.get("control")),
            "vanilla_over_method": ratios,
            "vanilla_median": {f: statistics.median(v) for f in PAIRED_FIELDS
                               if (v := [r["control"]["timing"][f] for r in once if r["control"]["timing"].get(f)])}}


def memory_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The record's `memory` from per-sample rows: the peak GPU bytes, and the KV-cache bytes after prefill and
    at the end of decoding, summed over layers and per layer (means per sample; rows without them left out)."""
    peaks = [r["peak_gpu_bytes"] for r in rows if r.get("peak_gpu_bytes") is not None]
    out: dict[str, Any] = {"peak_gpu_bytes": max(peaks) if peaks else None}
    for when in ("prefill", "end"):
        layers = [r[f"kv_layer_bytes_{when}"] for r in rows if r.get(f"kv_layer_bytes_{when}")]
        if layers and len({len(x) for x in layers}) == 1:
            per_layer = [statistics.fmean(column) for column in zip(*layers, strict=True)]
            out[f"kv_bytes_{when}"], out[f"kv_layer_bytes_{when}"] = sum(per_layer), per_layer
    return out


def tokens_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The record's `tokens` from per-sample rows: mean visual tokens in / out (per stage, per LLM stage, per
    video frame where they apply) and prompt lengths."""
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


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_record(directory: Path, record: RunRecord) -> Path:
    path = directory / RECORD_NAME
    write_json_atomic(path, record.to_dict())
    return path


def load_record(path: Path) -> RunRecord:
    return RunRecord.from_dict(json.loads(path.read_text()))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, Any]:
    import torch
    import transformers

    import prunebench

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prunebench": prunebench.__version__,
        "git_sha": git_sha(),
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (none if it is missing); a torn line (killed mid-write) is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
