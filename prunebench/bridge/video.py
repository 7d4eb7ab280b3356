"""VLMEvalKit's video benchmarks (Video-MME, MVBench, LongVideoBench) through the bridge.

Where VLMEvalKit's loaders look (`vlmeval/dataset/videomme.py`, `mvbench.py`, `longvideobench.py`,
`prepare_dataset`): the newest snapshot of the dataset's Hugging Face repo in the HF hub cache
(`get_cache_path(repo_id)`), holding `<name>.tsv` (MD5-checked against the class's `MD5`) and the
videos the TSV names; a miss falls back to `snapshot_download` (network). The bridge never lets
that fallback run: the folder (`dataset.data_dir=`, else that snapshot) and every video the TSV names are
checked before the model loads, and VLMEvalKit's own loader then reads the folder through a private
hub cache whose only snapshot is that folder. Every name (the base name, a subset, a generated test set)
gets a subclass of the dataset's class whose `MD5` is the local file's, as the image path registers
`DATASET_MD5` for every name it builds; everything else (prompt, frame sampling, scorer) is VLMEvalKit's.

Frames: `nframe` (or `fps`) per dataset YAML, VLMEvalKit's sampling; the sampled frames are written
as JPEGs under `<LMUData>/images/<name>/` (LMUData = the data folder for the run).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunebench.bridge import tsv
from prunebench.bridge.isolate import scoped_env
from prunebench.errors import UserError


@dataclass(frozen=True)
class VideoSet:
    """What VLMEvalKit's loader of one video benchmark needs locally."""

    cls: str  # the class in vlmeval.dataset
    repo_id: str  # the HF dataset repo its prepare_dataset reads from the hub cache
    columns: tuple[str, ...]  # TSV columns that together name a video file, relative to the folder
    fps_ok: bool  # MVBench's build_prompt refuses fps (ValueError: use MVBench_MP4)


VIDEO_SETS: dict[str, VideoSet] = {
    "Video-MME": VideoSet("VideoMME", "lmms-lab/Video-MME", ("video_path",), True),
    "MVBench": VideoSet("MVBench", "OpenGVLab/MVBench", ("prefix", "video"), False),
    "LongVideoBench": VideoSet("LongVideoBench", "longvideobench/LongVideoBench", ("video_path",), True),
}


def video_set(base: str) -> VideoSet:
    if base not in VIDEO_SETS:
        raise UserError(f"video dataset '{base}' is not wired through the bridge; valid: {', '.join(VIDEO_SETS)}")
    return VIDEO_SETS[base]


def frame_policy(dcfg: Mapping[str, Any]) -> tuple[int, float]:
    """(nframe, fps) from the dataset YAML: exactly one of them set, as VLMEvalKit requires."""
    nframe, fps = int(dcfg.get("nframe") or 0), float(dcfg.get("fps") or -1)
    if (nframe > 0) == (fps > 0):
        raise UserError(f"dataset {dcfg['name']}: set exactly one of nframe (frames per video) and fps; "
                        f"valid: e.g. nframe=8 fps=null")
    if fps > 0 and not video_set(str(dcfg.get("base") or dcfg["name"])).fps_ok:
        raise UserError(f"dataset {dcfg['name']}: VLMEvalKit's MVBench samples by frame count only; "
                        f"valid: nframe=<N> fps=null")
    return nframe, fps


def hub_dir(repo_id: str) -> str:
    """The hub cache's folder name of a dataset repo (huggingface_hub's layout)."""
    return "datasets--" + repo_id.replace("/", "--")


def default_folder(repo_id: str) -> Path | None:
    """The newest snapshot of `repo_id` in the HF hub cache (VLMEvalKit's `HFCacheRoot` order)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        if os.environ.get(var) and Path(os.environ[var]).exists():
            root = Path(os.environ[var])
            root = root if root.name == "hub" else root / "hub"
            break
    else:
        root = Path.home() / ".cache" / "huggingface" / "hub"
    snapshots = sorted((root / hub_dir(repo_id) / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def video_paths(rows: list[dict[str, str]], columns: tuple[str, ...]) -> list[str]:
    """Every video file the TSV names, relative to the data folder, in order, without repeats."""
    seen: dict[str, None] = {}
    for row in rows:
        seen[os.path.join(*(row[c] for c in columns))] = None
    return list(seen)


def check_video_data(folder: Path | None, name: str, base: str, md5: str | None) -> Path:
    """`<folder>/<name>.tsv` (MD5 when given) and every video it names, or one UserError line."""
    spec = video_set(base)
    how = (f"download the HF dataset {spec.repo_id} and let VLMEvalKit build {base}.tsv once (network), "
           f"or set dataset.data_dir= to a folder holding {name}.tsv and its videos")
    if folder is None:
        raise UserError(f"dataset {name}: no snapshot of {spec.repo_id} in the Hugging Face hub cache; {how}")
    path = tsv.check_data(folder, name, md5, None) if (folder / f"{name}.tsv").is_file() else None
    if path is None:
        raise UserError(f"dataset {name}: {folder / (name + '.tsv')} is missing; {how}")
    columns, rows = tsv.read_tsv(path)
    missing_cols = [c for c in (*spec.columns, "question", "index") if c not in columns]
    if missing_cols:
        raise UserError(f"dataset {name}: {path} lacks the column(s) {', '.join(missing_cols)} of VLMEvalKit's "
                        f"{base} format; valid: a TSV written by VLMEvalKit's {spec.cls}.prepare_dataset")
    missing = [v for v in video_paths(rows, spec.columns) if not (folder / v).exists()]
    if missing:
        raise UserError(f"dataset {name}: {len(missing)} video(s) named in {path.name} are missing under {folder}, "
                        f"e.g. {missing[0]}; {how}")
    return path


@contextmanager
def private_hub(work: Path, repo_id: str, folder: Path) -> Iterator[None]:
    """HF_HUB_CACHE -> a hub cache under `work` whose one snapshot of `repo_id` is `folder` (a link).

    VLMEvalKit's `get_cache_path` then finds the folder exactly as it finds a downloaded dataset;
    the variable is put back on exit (the bridge also restores the whole environment).
    """
    hub = work / "hub"
    repo = hub / hub_dir(repo_id)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "snapshots").mkdir(exist_ok=True)
    link = repo / "snapshots" / "local"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(folder.resolve(), target_is_directory=True)
    (repo / "refs" / "main").write_text("local")
    with scoped_env("HF_HUB_CACHE", str(hub)):
        yield


def dataset_class(api: Any, base: str, name: str, folder: Path) -> Any:
    """A subclass of VLMEvalKit's class for `base` accepting the local TSV's MD5, for `name` only."""
    spec = video_set(base)
    owner = next((c for c in api.dataset_classes if c.__name__ == spec.cls), None)
    if owner is None:
        raise UserError(f"VLMEvalKit has no dataset class {spec.cls} in this version; valid: a clone with "
                        f"vlmeval/dataset/{spec.cls.lower()}.py")
    # always the local file's MD5 (the base name too): with dataset.md5=null, VLMEvalKit's own
    # check_integrity would otherwise fail on the user's TSV and fall back to snapshot_download
    return type(owner.__name__, (owner,), {"MD5": tsv.file_md5(folder / f"{name}.tsv"),
                                           "supported_datasets": classmethod(lambda cls: [name])})


def build_video_dataset(api: Any, base: str, name: str, folder: Path, work: Path, nframe: int,
                        fps: float) -> Any:
    """VLMEvalKit's dataset object, its loader reading `folder` through the private hub cache."""
    cls = dataset_class(api, base, name, folder)
    with private_hub(work, video_set(base).repo_id, folder):
        return cls(dataset=name, nframe=nframe, fps=fps)
