"""Sweeps at the speed of the model: the jobs of a multirun share one load of each model and one build of each
dataset, and their records and predictions equal those of the same jobs run each in its own process."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prunebench.cli import models_first
from prunebench.data.datasets import build_dataset
from prunebench.models import loader

COMMON = ("dataset=shapes", "limit=3", "control=0", "baseline=false", "report=false")
JOBS = (("random_pre", "0.5"), ("fastv", "0.25"), ("evoprune", "0.5"))


def _outputs(results: Path) -> dict[str, tuple]:
    """Per job folder (method/keep): its answers, per-sample visual counts, and the record's tokens / counts."""
    out = {}
    for record_path in sorted(results.glob("tiny_llava/*/*/*/record.json")):
        record = json.loads(record_path.read_text())
        rows = [json.loads(line) for line in (record_path.parent / "predictions.jsonl").read_text().splitlines()]
        answers = [(r["index"], r["prediction"], r.get("n_visual_out")) for r in rows if not r.get("control")]
        key = f"{record['method']}/{record['keep']}"
        out[key] = (answers, record["tokens"], record["n_samples"], record["n_failed"], record["notes"])
    return out


def test_sweep_records_equal_separate_processes(tiny_path, tmp_path):
    from test_cli import cli

    model = ("model=tiny_llava", f"model.path={tiny_path}")
    swept = cli("-m", *(f"{k}={','.join(dict.fromkeys(v))}" for k, v in
                        (("method", [j[0] for j in JOBS]), ("keep", [j[1] for j in JOBS]))),
                *model, *COMMON, f"results_dir={tmp_path / 'sweep'}")
    assert swept.returncode == 0, swept.stderr[-2000:]
    assert swept.stderr.count("[prunebench] loaded model tiny_llava") == 1  # one load for 9 jobs
    for method, keep in JOBS:
        alone = cli(f"method={method}", f"keep={keep}", *model, *COMMON, f"results_dir={tmp_path / 'alone'}")
        assert alone.returncode == 0, alone.stderr[-2000:]
    separate, together = _outputs(tmp_path / "alone"), _outputs(tmp_path / "sweep")
    assert separate
    for key, value in separate.items():
        assert together[key] == value, key


def test_the_resident_model_is_reused_only_for_the_same_config(tiny_path):
    cfg = {"name": "t", "path": str(tiny_path)}
    first, reused = loader.resident_model(cfg, torch.device("cpu"))
    again, reused_again = loader.resident_model(dict(cfg), torch.device("cpu"))
    assert again is first and reused_again
    other, reused_other = loader.resident_model({**cfg, "untrained": True}, torch.device("cpu"))
    assert other is not first and not reused_other
    loader.release_resident()


def test_a_dataset_is_built_once_per_config():
    cfg = {"kind": "shapes", "name": "shapes", "n": 4}
    a, b = build_dataset(cfg), build_dataset(dict(cfg))
    assert a is b and a.items() == b.items() and a.items() is not a.items()  # shared items, fresh lists
    assert build_dataset({**cfg, "seed": 1}).items() != a.items()


def test_multirun_sweeps_the_model_slowest():
    argv = ["-m", "method=fastv,divprune", "model=tiny_llava,tiny_qwen25vl", "keep=0.5"]
    assert models_first(argv) == ["-m", "model=tiny_llava,tiny_qwen25vl", "method=fastv,divprune", "keep=0.5"]
    assert models_first(["method=fastv", "model=x"]) == ["method=fastv", "model=x"]  # one job: as given
    assert models_first(["--config-name", "config", "-m", "keep=0.5", "model=a,b"]) == \
        ["--config-name", "config", "-m", "model=a,b", "keep=0.5"]


def test_the_prepared_gpu_check_runs_dry_on_cpu(tmp_path):
    """`make gpu-check DRY=1`: the GPU check's whole path (four families, a video, every method, the table) on
    the tiny checkpoints; a refused job is a row, not a stop."""
    import subprocess
    import sys

    from test_cli import REPO

    out = tmp_path / "gpu_check.md"
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry", "--limit", "1", "--out", str(out),
                           "--results", str(tmp_path / "results")], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# GPU check (DRY RUN on CPU")
    rows = [line for line in text.splitlines() if line.startswith("| tiny_")]
    assert len(rows) == 16
    assert {line.split(" | ")[3] for line in rows} == {"vanilla", "fastv", "divprune", "evoprune"}
    assert all("| perf_counter |" in line or "refused:" in line for line in rows)


def test_progress_in_logs_is_a_line_per_tenth(capsys):
    from prunebench.progress import LogProgress

    with LogProgress(100, "fastv keep=0.5") as bar:
        for _ in range(100):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("[prunebench] fastv keep=0.5: 100/100 samples,")
    assert "samples/s, ETA" in lines[0]


def test_submitit_local_launcher_records_equal_the_basic_launchers(tiny_path, tmp_path):
    """`hydra/launcher=submitit_local` (the SLURM launcher's local twin) with a grid inside each task: the same
    records as the same grid run by the basic launcher in this process."""
    import pytest

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra (make setup installs it)")
    from test_cli import cli

    grid = ("model=tiny_llava", f"model.path={tiny_path}", *COMMON, "grid.method=[random_pre,fastv]",
            "grid.keep=[0.5,0.25]")
    local = cli("-m", "hydra/launcher=submitit_local", *grid, f"results_dir={tmp_path / 'submitit'}")
    assert local.returncode == 0, local.stderr[-2000:]
    basic = cli(*grid, f"results_dir={tmp_path / 'basic'}")
    assert basic.returncode == 0, basic.stderr[-2000:]
    assert basic.stderr.count("[prunebench] loaded model tiny_llava") == 1  # the grid: one load for 4 jobs
    submitted, here = _outputs(tmp_path / "submitit"), _outputs(tmp_path / "basic")
    assert len(here) == 4 and submitted == here


def test_a_bad_grid_is_one_line(tiny_path):
    from test_cli import cli

    for grid, message in (("grid.keep=[0.5,abc]", "grid.keep must be a number in (0, 1], got 'abc'"),
                          ("grid.method=[fastv,fastvv]", "unknown method 'fastvv' (did you mean 'fastv'?)")):
        out = cli("model=tiny_llava", f"model.path={tiny_path}", "dataset=shapes", "limit=1", grid, timeout=120)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-800:]
