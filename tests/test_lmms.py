"""prunebench as an lmms-eval model (issue 15): lmms-eval's own command line runs the pruned model on the probe
suite exported as a local task, and its score and answers equal the built-in run's. Needs lmms-eval (the
optional extra, in its own venv: `make lmms-test`); skipped elsewhere."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason="lmms-eval is not installed (make lmms-test runs this in its own venv)")

N = 12


def test_lmms_eval_cli_scores_the_pruned_model_as_prunebench_does(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from prunebench import runner
    from prunebench.checks import CONFIG_DIR
    from prunebench.lmms.task import export
    from prunebench.record import load_record, read_jsonl

    export(tmp_path / "task", "probe", n=N)
    sink = tmp_path / "prunebench.jsonl"
    args = f"model=probe_llava,method=divprune,keep=0.111,device=cpu,predictions={sink}"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lmms_eval", "eval", "--model", "prunebench", "--model_args", args,
                           "--tasks", "prunebench_probe", "--include_path", str(tmp_path / "task"),
                           "--output_path", str(tmp_path / "out"), "--log_samples", "--batch_size", "1"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    lmms_score = results["results"]["prunebench_probe"]["accuracy,none"]

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["method=divprune", "keep=0.111", f"limit={N}", "device=cpu",
                                           f"results_dir={tmp_path / 'results'}", "control=0"])
    path = runner.run(cfg, quiet=True)
    record = load_record(path)
    builtin = read_jsonl(path.parent / "predictions.jsonl")
    ours = read_jsonl(sink)
    assert [r["index"] for r in ours] == list(range(N))
    assert [r["prediction"] for r in ours] == [r["prediction"] for r in builtin]
    assert [r["n_visual_out"] for r in ours] == [r["n_visual_out"] for r in builtin] == [16] * N
    assert lmms_score == pytest.approx(record.score)


def test_model_args_are_checked_in_one_line() -> None:
    from prunebench.errors import UserError
    from prunebench.lmms.model import PrunebenchLMM

    with pytest.raises(UserError, match="keep must be a number in"):
        PrunebenchLMM(model="probe_llava", method="divprune", keep=1.5)


def _cfg(tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from prunebench.checks import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["method=divprune", "keep=0.111", f"limit={N}", "device=cpu",
                                            f"results_dir={tmp_path}", *overrides])


def test_backend_lmms_eval_record_equals_the_builtin_run_and_resumes(tmp_path: Path, monkeypatch) -> None:
    """`dataset=lmms_probe` (kind lmms_eval): lmms-eval's evaluator drives the pruned model; the record's score
    and per-sample rows equal the built-in run's; killed after 5 answers, the rerun generates only the rest."""
    from prunebench import generation, runner
    from prunebench.record import load_record, read_jsonl

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    builtin = load_record(runner.run(_cfg(tmp_path, "control=0"), quiet=True))
    real, timed, kill = generation.generate_timed, [], [True]

    def dying(*args, **kwargs):
        if kwargs.get("flops", True):  # a timed answer (warm-ups count nothing)
            timed.append(1)
            if kill[0] and len(timed) == 6:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_timed", dying)
    cfg = _cfg(tmp_path, "dataset=lmms_probe")
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, quiet=True)
    timed.clear()
    kill[0] = False
    path = runner.run(cfg, quiet=True)
    assert len(timed) == N - 5  # the 5 flushed answers are not generated again
    record = load_record(path)
    assert record.status == "complete" and record.benchmark["backend"] == "lmms_eval"
    assert record.n_samples == N and record.score == pytest.approx(builtin.score)
    assert record.tokens["n_visual_out"] == builtin.tokens["n_visual_out"]
    rows = sorted(read_jsonl(path.parent / "predictions.jsonl"), key=lambda r: r["index"])
    built = read_jsonl(builtin_predictions(tmp_path))
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in built]


def builtin_predictions(root: Path) -> Path:
    return next(p for p in root.rglob("predictions.jsonl") if "/probe-n" in str(p))
