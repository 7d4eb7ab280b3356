"""The command line: one-line errors for user mistakes, multirun, baseline and report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prunebench.cli import check_group_choices
from prunebench.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "prunebench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_unknown_group_choice_names_valid_ones():
    with pytest.raises(UserError, match=r"unknown method 'fastvv' \(did you mean 'fastv'\?\); valid choices: .*divprune"):
        check_group_choices(["method=fastvv"])
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        check_group_choices(["dataset=shapes,nope"])
    check_group_choices(["method=fastv,random_pre", "keep=0.5", "model.path=x"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["method=nope"], "unknown method 'nope'"),
        (["keep=0"], "keep must be a number in (0, 1], got 0"),
        (["keep=1.5"], "keep must be a number in (0, 1], got 1.5"),
        (["method=fastv", "method.params.window=3"], "method 'fastv' has no parameter(s) window; valid: layer"),
        (["model=llava15", "model.path=/nonexistent/llava", "baseline=false"], "no weights for model 'llava15'"),
        (["model=llava15", "model.weights=random", "model.arch=nope", "baseline=false"],
         "no shipped architecture 'nope'"),
        (["device=tpu"], "device must be one of"),
        (["method=fastv", "method.params.layer=99"], "fastv: layer must be in 1..3"),
        (["method=random_pre", "method.params.order=zigzag"],
         "random_pre: method.params.order must be one of: raster, shuffled, got 'zigzag'"),
        (["method=tome", "method.params.score_dtype=fp16"],
         "tome: method.params.score_dtype must be one of: model, fp32, got 'fp16'"),
        (["method=mustdrop", "method.params.token_order=cls"],
         "mustdrop: method.params.token_order must be one of: merged_first, raster, got 'cls'"),
    ],
)
def test_user_mistakes_are_one_line(args, message, tmp_path):
    out = cli(*args, f"results_dir={tmp_path}", "limit=1")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("prunebench: error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr


def test_multirun_baseline_and_report(tiny_path, tmp_path):
    out = cli("-m", "method=random_pre,fastv", "keep=0.5,0.25", "model=tiny_llava", "dataset=shapes", f"model.path={tiny_path}", "limit=2",
              f"results_dir={tmp_path}", "dataset.image_size=48")
    assert out.returncode == 0, out.stderr
    records = sorted(re.sub(r"-[0-9a-f]{10}/", "/", str(p.relative_to(tmp_path))) for p in tmp_path.rglob("record.json"))
    assert records == [f"tiny_llava/shapes-n2/{m}/keep{k}-seed0/record.json"
                       for m, k in [("fastv", "0.250"), ("fastv", "0.500"), ("random_pre", "0.250"),
                                    ("random_pre", "0.500"), ("vanilla", "1.000")]]
    assert "vanilla (upper bound)" in out.stdout and "> accuracy is noise" in out.stdout
    assert "| 0.25 " in out.stdout and "shapes[:2]" in out.stdout
    again = cli("method=fastv", "keep=0.5", "model=tiny_llava", "dataset=shapes", f"model.path={tiny_path}", "limit=2", f"results_dir={tmp_path}",
                "dataset.image_size=48")
    assert again.returncode == 0 and again.stderr.count("complete, skipped") == 2


def test_multirun_sweeps_methods_with_a_shared_param(tiny_path, tmp_path):
    """Hydra composes a multirun's base config without the swept method: the shared parameter must
    still reach every job (forced with ++ after prunebench checked every swept method has it)."""
    from prunebench.cli import force_method_params

    assert force_method_params(["method=fastv", "method.params.layer=1"]) == ["method=fastv", "method.params.layer=1"]
    assert force_method_params(["-m", "method=a,b", "method.params.layer=1", "keep=0.5"]) == [
        "-m", "method=a,b", "++method.params.layer=1", "keep=0.5"]
    out = cli("-m", "method=random_intra,fastv", "method.params.layer=1", "model=tiny_llava", "dataset=shapes", f"model.path={tiny_path}", "limit=1",
              f"results_dir={tmp_path}", "dataset.image_size=48", "baseline=false", "report=false")
    assert out.returncode == 0, out.stderr
    records = sorted(p.parent.parent.name for p in tmp_path.rglob("record.json"))
    assert len(records) == 2 and all(r.startswith(("fastv-", "random_intra-")) for r in records), records


def test_a_refused_job_does_not_stop_a_sweep(tiny_path, tmp_path):
    """EvoPrune cannot merge 35 of 36 tokens over the tiny encoder's layers: that job is refused (one line,
    a 'refused' record), the other job of the sweep still runs, and the sweep exits 2 naming it."""
    from prunebench.record import load_record
    from prunebench.report import collect, render

    out = cli("-m", "method=evoprune,random_pre", "keep=0.01", "model=tiny_llava", f"model.path={tiny_path}",
              "dataset=shapes", "limit=1", f"results_dir={tmp_path}", "dataset.image_size=48", "baseline=false",
              "report=false")
    assert out.returncode == 2, out.stderr
    assert "1 job(s) refused" in out.stderr and "Traceback" not in out.stderr
    records = {p.parent.parent.name: load_record(p) for p in tmp_path.rglob("record.json")}
    assert records["random_pre"].status == "complete"
    assert records["evoprune"].status == "refused" and "at most" in records["evoprune"].notes[-1]
    assert "1 run refused by the model" in render(collect(tmp_path))


def test_help_explains_the_options_and_lists_the_choices():
    out = cli("--help", timeout=120)
    assert out.returncode == 0
    assert "fraction of visual tokens kept, in (0, 1]" in out.stdout and "lmms_eval" in out.stdout
    choices = {line.split(":")[0]: line for line in out.stdout.splitlines() if line.startswith(("model:", "method:"))}
    assert "qwen3vl_8b" in choices["model"] and "fastv" in choices["method"]
