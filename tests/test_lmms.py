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
