"""One job through VLMEvalKit: data checks (before the model loads) -> `infer_data_job` with the
pruned model -> `dataset.evaluate(pred_file, model='exact_matching' | judge)` -> one record.

Torchrun: every rank answers VLMEvalKit's shard (`RANK`/`WORLD_SIZE`, every N-th sample) into its own
predictions file; rank 0 merges them, scores and writes the one record, with timings summed / medianed
over all samples and per-rank figures kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prunebench.bridge import guard, naming, scores, tsv
from prunebench.bridge.isolate import contained, scoped_env, vlmeval_api
from prunebench.errors import UserError
from prunebench.flops import flops_summary
from prunebench.jobs import (
    Job,
    job_lock,
    model_for_job,
    new_record,
    plain,
    reusable,
    say,
    writable_results_dir,
)
from prunebench.record import PREDICTIONS_NAME, memory_summary, timing_summary, tokens_summary

JUDGE_ENV = "OPENAI_API_KEY"


@dataclass(frozen=True)
class BridgeData:
    """Where the benchmark is and how it is scored, checked before the model loads."""

    name: str  # the name VLMEvalKit builds (a subset's custom name when limited)
    base: str | None  # VLMEvalKit dataset whose scorer is used (None: prunebench's own scorer)
    root: Path
    limit: int | None
    score: dict[str, Any]
    scorer: str  # "vlmeval" | "shapes"
    judge: dict[str, Any] | None
    max_new_tokens: int
    modality: str = "image"  # "video": Video-MME / MVBench / LongVideoBench (bridge.video)
    nframe: int = 0  # video: frames sampled per video by VLMEvalKit (or fps > 0 instead)
    fps: float = -1.0
    video_llm: bool = False  # video: VLMEvalKit sends the video file (decoded here) instead of frames
    tsv_md5: str | None = None  # MD5 of <root>/<name>.tsv as VLMEvalKit will read it (keys its decoded images)


def _limit(cfg: Mapping[str, Any]) -> int | None:
    own = guard.check_limit(cfg["dataset"].get("limit"), "dataset.limit")
    return own if own is not None else guard.check_limit(cfg.get("limit"), "limit")


def judge_kwargs(dcfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """None for exact matching; the judge's settings, or a one-line stop when none is configured."""
    judge = dcfg.get("judge")
    if not judge:
        return None
    if not judge.get("api_base") or not os.environ.get(judge.get("key_env") or JUDGE_ENV):
        raise UserError(f"dataset {dcfg['name']} is scored by an LLM judge ({judge.get('model')}): set "
                        f"dataset.judge.api_base=<OpenAI-compatible URL> and ${judge.get('key_env') or JUDGE_ENV}")
    return dict(judge)


def prepare_data(cfg: Mapping[str, Any]) -> BridgeData:
    """Data location, MD5, judge, subset TSV: every check that can fail, before anything loads."""
    dcfg = cfg["dataset"]
    if dcfg.get("modality", "image") == "video":
        return prepare_video_data(cfg)
    if dcfg.get("modality", "image") != "image":
        raise UserError(f"dataset {dcfg['name']}: modality {dcfg['modality']} is not wired through the "
                        f"bridge; valid: image, video")
    judge = judge_kwargs(dcfg)
    root = tsv.data_root(dcfg.get("data_dir"))
    name, limit = str(dcfg["name"]), _limit(cfg)
    if dcfg.get("export") == "shapes":  # the built-in suite, written on demand (no download)
        e = dcfg.get("export_args") or {}
        tsv.export_shapes(root, name, n=int(e.get("n", 100)), seed=int(e.get("seed", 0)),
                          image_size=int(e.get("image_size", 96)))
    elif dcfg.get("export") == "probe":  # the probe suite (data/probe.py), also written on demand
        e = dict(dcfg.get("export_args") or {})
        tsv.export_probe(root, name, n=int(e.get("n", 600)), seed=int(e.get("seed", 0)),
                         image_size=int(e.get("image_size", 96)), families=e.get("families"))
    else:
        tsv.check_data(root, name, dcfg.get("md5"), dcfg.get("url"))
    if limit and limit < int(dcfg.get("min_limit") or 1):
        raise UserError(f"dataset {name}: limit={limit} is too small for its scorer; valid: limit >= "
                        f"{dcfg['min_limit']} (every category must be present)")
    if limit:
        name, _ = tsv.write_subset(root, name, limit, int(dcfg.get("subset_seed", 0)), dcfg.get("group_by"),
                                   dcfg.get("stratify", "category"))
    scores.check_mapping(dcfg["score"]) if dcfg.get("scorer", "vlmeval") == "vlmeval" else None
    return BridgeData(name=name, base=dcfg.get("base", dcfg["name"]), root=root, limit=limit,
                      score=plain(dcfg.get("score") or {}), scorer=str(dcfg.get("scorer", "vlmeval")),
                      judge=judge, max_new_tokens=int(dcfg.get("max_new_tokens", 16)),
                      tsv_md5=tsv.file_md5(root / f"{name}.tsv"))


def prepare_video_data(cfg: Mapping[str, Any]) -> BridgeData:
    """The video sets: folder, TSV + MD5, every video file, frame policy, subset; before anything loads."""
    from prunebench.bridge import video

    dcfg = cfg["dataset"]
    base, name, limit = str(dcfg.get("base") or dcfg["name"]), str(dcfg["name"]), _limit(cfg)
    spec = video.video_set(base)
    nframe, fps = video.frame_policy(dcfg)
    judge = judge_kwargs(dcfg)
    folder = Path(dcfg["data_dir"]).expanduser() if dcfg.get("data_dir") else video.default_folder(spec.repo_id)
    video.check_video_data(folder, name, base, dcfg.get("md5"))
    assert folder is not None  # check_video_data refused a missing one
    if limit:
        name, _ = tsv.write_subset(folder, name, limit, int(dcfg.get("subset_seed", 0)), dcfg.get("group_by"),
                                   dcfg.get("stratify", "task_type"))
    scores.check_mapping(dcfg["score"])
    return BridgeData(name=name, base=base, root=folder, limit=limit, score=plain(dcfg["score"]), scorer="vlmeval",
                      judge=judge, max_new_tokens=int(dcfg.get("max_new_tokens", 16)), modality="video",
                      nframe=nframe, fps=fps, video_llm=bool(dcfg.get("video_llm", False)),
                      tsv_md5=tsv.file_md5(folder / f"{name}.tsv"))


def check_backend(api: Any, cfg: Mapping[str, Any], data: BridgeData) -> None:
    """What needs VLMEvalKit's tables but not the model: the class that will score the dataset has an
    `evaluate` (a custom name without `+dataset.base=` has none), before the model loads."""
    if data.modality == "image" and data.scorer == "vlmeval":
        dcfg = cfg["dataset"]
        guard.check_scorer(api, dcfg, str(dcfg["name"]), dcfg.get("base"))


def _vlmeval_modules() -> list[Any]:
    import sys

    return [m for n, m in list(sys.modules.items()) if (n == "vlmeval" or n.startswith("vlmeval.")) and m]


def build_vlmeval_dataset(api: Any, data: BridgeData, work: Path | None = None) -> Any:
    """Build `data.name`, never letting VLMEvalKit download over the local TSV or reuse images decoded
    from another TSV content.

    The local file's MD5 is registered for the name on the class that builds it (a custom name also
    gets the file as its URL, on its base's class, so it routes to that scorer): VLMEvalKit's own MD5
    check then accepts the user's file (`dataset.md5=null` included) instead of downloading over it.
    The built dataset's `img_root` is a folder keyed on the TSV's MD5 (`guard.key_images`).
    """
    if data.modality == "video":
        from prunebench.bridge import video

        assert data.base is not None and work is not None
        return video.build_video_dataset(api, data.base, data.name, data.root, work, data.nframe, data.fps)
    path = data.root / f"{data.name}.tsv"
    md5 = data.tsv_md5 or tsv.file_md5(path)
    custom = data.base is not None and data.name != data.base
    owner = guard.resolve_owner(api, data.base if custom else data.name)
    if custom and owner is None:
        raise UserError(f"VLMEvalKit has no dataset '{data.base}' in this version; valid: a name from "
                        f"its DATASET_URL tables")
    if owner is not None:
        # copy-on-write: a subclass sharing its parent's dict must not register the name there too
        if custom:
            owner.DATASET_URL = {**owner.DATASET_URL, data.name: str(path)}
        owner.DATASET_MD5 = {**owner.DATASET_MD5, data.name: md5}
    with guard.no_download(_vlmeval_modules()), guard.image_cache(data.root, data.name, path, md5):
        dataset = api.build_dataset(data.name)
    if dataset is None:
        raise UserError(f"VLMEvalKit could not build dataset {data.name} from {data.root}")
    guard.key_images(dataset, data.root, data.name, path, md5)
    return dataset


def merged_timing(rows_by_rank: Mapping[int, list[dict[str, Any]]], clock: str) -> dict[str, Any]:
    """Sums and medians over every sample of every rank; per-rank figures kept when there are several."""
    every = [r for rows in rows_by_rank.values() for r in rows]
    timing = timing_summary(every, clock) if every else {}
    if len(rows_by_rank) > 1:
        timing["per_rank"] = {str(k): timing_summary(v, clock) for k, v in sorted(rows_by_rank.items()) if v}
    return timing


def shapes_score(pred_rows: list[dict[str, Any]]) -> tuple[float, dict[str, float]]:
    """prunebench's own exact-match scorer on VLMEvalKit's prediction table (the built-in suite)."""
    from prunebench.data.datasets import accuracy
    from prunebench.data.shapes import score_answer

    rows = [{"category": r["category"], "correct": score_answer(str(r["prediction"]), str(r["answer"]))}
            for r in pred_rows]
    scored = accuracy(rows)
    return scored.score, scored.metrics


@contextmanager
def _lmudata(root: Path) -> Iterator[None]:
    """VLMEvalKit reads $LMUData (LMUDataRoot); point it at data_dir for the run only."""
    with scoped_env("LMUData", str(root)):
        yield


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _prediction_files(out: Path) -> list[Path]:
    return sorted(out.glob("predictions.rank*.jsonl")) + [out / PREDICTIONS_NAME]


def run_vlmeval(cfg: Mapping[str, Any], *, quiet: bool = False) -> Path:
    """Run (or resume, or skip) one VLMEvalKit job; returns the record path (rank 0 writes it)."""

    guard.check_vlmeval_config(cfg["dataset"])  # every dataset parameter's type and range
    data = prepare_data(cfg)  # every data / judge error, before the model loads
    api = vlmeval_api()  # then the backend itself (one line on how to install it)
    check_backend(api, cfg, data)  # the scorer exists (a custom name needs +dataset.base=)
    job = replace(Job.from_config({**plain(cfg), "limit": None}), dataset=data.name, limit=data.limit)
    out = job.directory(writable_results_dir(cfg["results_dir"]))
    rank, world = _rank_world()
    # one process per job folder (torchrun: rank 0 holds it for all ranks)
    with job_lock(out, bool(cfg.get("wait", False))) if rank == 0 else nullcontext():
        return _run_job(cfg, job, data, api, out, rank, world, quiet)


def _run_job(cfg: Mapping[str, Any], job: Any, data: BridgeData, api: Any, out: Path, rank: int, world: int,
             quiet: bool) -> Path:
    from prunebench.record import RECORD_NAME, save_record

    record_path = out / RECORD_NAME
    check_job_data(out, data)  # a job folder answered on another TSV content is not resumed or reused
    if reusable(record_path, job):
        say(quiet, f"[prunebench] complete, skipped: {record_path}")
        return record_path
    if world > 1:
        _init_gloo()
    record, table, pred_rows, rows_by_rank = _infer_and_score(cfg, job, data, api, out, rank, world)
    if rank == 0:
        _fill(record, job, data, table, pred_rows, rows_by_rank, out)
        save_record(out, record)
    return record_path


def check_job_data(out: Path, data: BridgeData) -> None:
    """The job folder's answers (predictions.jsonl, VLMEvalKit's files under vlmeval/) belong to the TSV
    content it first ran on (`vlmeval/prunebench_tsv.json`); another content is one line, not a resume."""
    if data.tsv_md5 is None:
        return
    work, path = out / "vlmeval", data.root / f"{data.name}.tsv"
    ran = guard.read_marker(work)
    if ran is not None and ran != data.tsv_md5:
        raise UserError(f"job folder {out} holds answers on another {path.name} (MD5 {ran}, now {data.tsv_md5}); "
                        f"rerun with another results_dir or remove {out}")
    if ran is None and not any(p.exists() for p in _prediction_files(out)):  # a fresh job: record its TSV
        guard.write_marker(work, path, data.tsv_md5)


def _init_gloo() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():  # VLMEvalKit's barriers need a process group; gloo works on CPU
        dist.init_process_group(backend="gloo")


def _infer_and_score(cfg: Mapping[str, Any], job: Any, data: BridgeData, api: Any, out: Path, rank: int,
                     world: int) -> tuple[Any, Any, list[dict[str, Any]], dict[int, list[dict[str, Any]]]]:
    from prunebench.bridge.model import Session, make_vlm, read_answers, track_index
    from prunebench.measure import instrument
    from prunebench.record import save_record
    from prunebench.stages import install
    from prunebench.stages.inputs import refuse_outside_builtin
    from prunebench.timing import Timer

    refuse_outside_builtin(job.method, "VLMEvalKit")
    work = out / "vlmeval"
    work.mkdir(parents=True, exist_ok=True)
    with contained(), _lmudata(data.root):  # VLMEvalKit reads (never downloads) the TSV, before the model
        dataset = build_vlmeval_dataset(api, data, work)
    loaded = model_for_job(job, cfg, quiet=rank != 0)
    if data.modality == "video":
        check_video_processor(loaded, data.name)
    record = new_record(job, cfg, loaded)
    if rank == 0:
        save_record(out, record)
    sink = out / (PREDICTIONS_NAME if world == 1 else f"predictions.rank{rank}.jsonl")
    name = model_name_for(job)
    table, pred_rows = None, []
    timer = Timer(loaded.device)
    with contained(), _lmudata(data.root):
        with instrument(loaded.model, loaded.seams, timer), \
                install(loaded.seams, job.method, job.keep, seed=job.seed, timer=timer) as inst:
            session = Session(loaded, inst, timer, job.seed, data.max_new_tokens, sink,
                              read_answers(_prediction_files(out)), warmup=int(cfg.get("warmup", 1)),
                              nframe=data.nframe if data.modality == "video" else 0)
            track_index(dataset, session)
            vlm = make_vlm(api, session, video_llm=data.video_llm)
            infer = api.infer_data_job_video if data.modality == "video" else api.infer_data_job
            infer(vlm, work_dir=str(work), model_name=name, dataset=dataset)
        record.positions = inst.positions.value
        record.method_card["positions"] = inst.positions.value
        record.notes += inst.notes
        if rank == 0:
            pred_file = api.get_pred_file_path(str(work), name, data.name)
            pred_rows = api.load(pred_file).to_dict("records")
            if data.scorer == "vlmeval":
                judge = {"model": "exact_matching"} if data.judge is None else data.judge
                table = dataset.evaluate(pred_file, **judge)
    rows = read_answers(_prediction_files(out))
    rows_by_rank = {r: [rows[str(p["index"])] for p in pred_rows[r::world] if str(p["index"]) in rows]
                    for r in range(world)} if rank == 0 else {}
    return record, table, pred_rows, rows_by_rank


def check_video_processor(loaded: Any, name: str) -> None:
    """A video benchmark needs the family's video processor (the Qwen processors here have none)."""
    if getattr(loaded.processor, "video_processor", None) is None:
        raise UserError(f"dataset {name} is a video benchmark but the processor of model '{loaded.name}' has no "
                        f"video processor here; valid: a family with one (llava_onevision)")


def _fill(record: Any, job: Any, data: BridgeData, table: Any, pred_rows: list[dict[str, Any]],
          rows_by_rank: dict[int, list[dict[str, Any]]], out: Path) -> None:
    import json

    from prunebench.record import now

    every = [r for rows in rows_by_rank.values() for r in rows]
    with (out / PREDICTIONS_NAME).open("w") as f:  # the merged file, in the dataset's order
        for row in sorted(every, key=lambda r: [str(p["index"]) for p in pred_rows].index(str(r["index"]))):
            f.write(json.dumps(row) + "\n")
    record.n_samples, record.n_failed = len(pred_rows), len(pred_rows) - len(every)
    if data.scorer == "vlmeval":
        flat = scores.flatten(table)
        record.score = scores.main_score(flat, data.score, len(pred_rows))
        record.metrics = flat
    else:
        record.score, record.metrics = shapes_score(pred_rows)
    clock = "cuda_events" if record.device.get("type") == "cuda" else "perf_counter"
    record.timing = merged_timing(rows_by_rank, clock)
    record.tokens = tokens_summary(every) if every else {}
    record.memory = memory_summary(every)
    record.flops = flops_summary(every)
    record.benchmark = {"backend": "vlmeval", "vlmeval_dataset": data.name, "scored_as": data.base,
                        "model_name": model_name_for(job), "score_mapping": data.score,
                        "judge": (data.judge or {}).get("model", "exact_matching"),
                        "world_size": len(rows_by_rank), "data_root": str(data.root), "tsv_md5": data.tsv_md5,
                        **({"nframe": data.nframe, "fps": data.fps, "video_llm": data.video_llm}
                           if data.modality == "video" else {})}
    record.status = "complete"
    record.finished_at = now()


def model_name_for(job: Any) -> str:
    return naming.model_name(job.model, job.method.name, dict(job.method.params), job.keep, job.seed,
                             job.method.positions.value)
