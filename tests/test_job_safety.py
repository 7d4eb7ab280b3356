"""Issue 13: an exact job identity, typed checks before anything loads, torn files, locks, interrupts, weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import REPO, cli
from test_runner import config, lines

from prunebench import runner
from prunebench.backends import builtin
from prunebench.errors import UserError
from prunebench.record import load_record
from prunebench.runner import Interrupted


def test_dataset_settings_and_exact_keep_are_part_of_the_job(tiny_path, tmp_path):
    base = runner.Job.from_config(config(tiny_path, tmp_path, "method=fastv", "keep=0.2"))
    other_n = runner.Job.from_config(config(tiny_path, tmp_path, "method=fastv", "keep=0.2", "dataset.n=50"))
    assert base.directory(tmp_path) != other_n.directory(tmp_path)
    low = runner.Job.from_config(config(tiny_path, tmp_path, "method=fastv", "keep=0.1996"))
    high = runner.Job.from_config(config(tiny_path, tmp_path, "method=fastv", "keep=0.2004"))
    assert low.directory(tmp_path).name.startswith("keep0.200-") and high.directory(tmp_path).name.startswith("keep0.200-")
    assert low.directory(tmp_path) != high.directory(tmp_path) != base.directory(tmp_path)
    assert low.key["keep"] == "0.1996" and base.key["dataset"]["n"] == 100 and other_n.key["dataset"]["n"] == 50


def test_two_settings_write_two_records_and_reuse_needs_an_equal_key(tiny_path, tmp_path):
    first = runner.run(config(tiny_path, tmp_path, "method=random_pre", "keep=0.5", "limit=2"), quiet=True)
    second = runner.run(config(tiny_path, tmp_path, "method=random_pre", "keep=0.5", "limit=2", "dataset.seed=7"),
                        quiet=True)
    assert first != second and load_record(first).key != load_record(second).key
    assert load_record(second).key["dataset"]["seed"] == 7
    # a complete record whose key is not the job's (an older record, a hand-copied folder) is not served
    data = json.loads(first.read_text())
    data["key"] = {**data["key"], "seed": 99}
    first.write_text(json.dumps(data))
    runner.run(config(tiny_path, tmp_path, "method=random_pre", "keep=0.5", "limit=2"), quiet=True)
    assert load_record(first).key["seed"] == 0


def test_a_truncated_record_is_a_warning_and_the_job_resumes(tiny_path, tmp_path, capsys):
    cfg = config(tiny_path, tmp_path, "method=random_pre", "keep=0.5", "limit=3")
    path = runner.run(cfg, quiet=True)
    path.write_text(path.read_text()[:40])  # torn record.json
    rec = load_record(runner.run(cfg))
    assert "unreadable" in capsys.readouterr().err
    assert rec.status == "complete" and rec.n_samples == 3
    assert [r["index"] for r in lines(path.parent / "predictions.jsonl")] == [0, 1, 2]  # nothing re-answered


def test_a_torn_last_line_is_cut_before_appending(tiny_path, tmp_path):
    cfg = config(tiny_path, tmp_path, "method=random_pre", "keep=0.5", "limit=3")
    path = runner.run(cfg, quiet=True)
    predictions = path.parent / "predictions.jsonl"
    text = predictions.read_text().splitlines(keepends=True)
    predictions.write_text("".join(text[:2]) + text[2][:25])  # killed mid-write of row 2
    path.unlink()
    rec = load_record(runner.run(cfg, quiet=True))
    rows = lines(predictions)  # every line readable
    assert [r["index"] for r in rows] == [0, 1, 2] and rec.n_samples == 3


def test_ctrl_c_says_what_is_saved(tiny_path, tmp_path, monkeypatch):
    cfg = config(tiny_path, tmp_path, "method=random_pre", "keep=0.5", "warmup=0")
    real = builtin._generate

    def interrupted(loaded, dataset, batch, *args, **kwargs):
        if any(it.index == 2 for it in batch):
            raise KeyboardInterrupt
        return real(loaded, dataset, batch, *args, **kwargs)

    monkeypatch.setattr(builtin, "_generate", interrupted)
    with pytest.raises(Interrupted, match=r"interrupted: 2 of 4 samples .* rerun the same command to resume"):
        runner.run(cfg, quiet=True)


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from prunebench import cli as cli_module

    def stop(cfg):
        raise Interrupted("interrupted: 3 of 10 samples of results/x are saved; rerun the same command to resume")

    monkeypatch.setattr(cli_module, "run_with_baseline", stop)
    monkeypatch.setattr(sys, "argv", ["prunebench", "baseline=false"])
    with pytest.raises(SystemExit) as exit_:
        cli_module.main()
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prunebench: interrupted: 3 of 10 samples of results/x are saved; rerun the same command to resume"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keep=abc"], "keep must be a number in (0, 1], got 'abc'"),
        (["-m", "keep=abc,0.2"], "keep must be a number in (0, 1], got 'abc'"),
        (["limit=abc"], "limit must be an integer >= 1 (or null), got 'abc'"),
        (["limit=1.5"], "limit must be an integer >= 1 (or null), got 1.5"),
        (["seed=abc"], "seed must be an integer >= 0, got 'abc'"),
        (["seed=1.5"], "seed must be an integer >= 0, got 1.5"),
        (["method=fastv", "method.params.layer=abc"], "method.params.layer must be an integer"),
        (["method=fastv", "method.params.layer=2.5"], "method.params.layer must be an integer"),
        (["dataset.n=0"], "dataset.n must be an integer >= 1, got 0"),
        (["dataset.n=-3"], "dataset.n must be an integer >= 1, got -3"),
        (["dataset.n=abc"], "dataset.n must be an integer >= 1, got 'abc'"),
        (["dataset.nope=1"], "dataset 'probe' has no setting 'nope'"),
        (["baseline=yes"], "baseline must be true or false, got 'yes'"),
    ],
)
def test_bad_values_are_one_line_before_anything_loads(args, message, tmp_path):
    out = cli(*args, f"results_dir={tmp_path}", timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("prunebench: error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr
    assert not list(tmp_path.rglob("record.json"))  # refused before any job folder was written


def test_results_dir_that_cannot_hold_jobs_is_one_line(tiny_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for where, message in [(blocker, "is not a directory"), (blocker / "under", "is not a directory")]:
        with pytest.raises(UserError, match=message):
            runner.writable_results_dir(where)
    out = subprocess.run([sys.executable, "-m", "prunebench", f"results_dir={blocker}", "limit=1", "baseline=false"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "is not a directory" in out.stderr


def test_a_held_job_is_refused_naming_the_pid_and_a_dead_lock_is_taken_over(tiny_path, tmp_path):
    cfg = config(tiny_path, tmp_path, "method=random_pre", "keep=0.5", "limit=2")
    out = runner.Job.from_config(cfg).directory(tmp_path)
    out.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, fcntl; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.seek(0); f.truncate(); f.write('4242\\n'); f.flush(); print('held', flush=True); time.sleep(60)"),
        str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=r"being run by PID 4242; wait=true waits"):
            runner.run(cfg, quiet=True)
    finally:
        holder.kill()
        holder.wait()
    # the holder died with its lock file still there: the next run takes it over
    assert (out / ".lock").read_text().strip() == "4242"
    assert load_record(runner.run(cfg, quiet=True)).status == "complete"


def test_two_processes_on_one_job_answer_every_index_once(tiny_path, tmp_path):
    args = ["-m", "prunebench", "model=tiny_llava", "dataset=shapes", f"model.path={tiny_path}", "limit=6",
            "device=cpu", "dataset.image_size=48", "method=random_pre", "keep=0.5", "baseline=false", "report=false",
            f"results_dir={tmp_path}", "wait=true"]
    procs = [subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    predictions = next(tmp_path.rglob("predictions.jsonl"))
    assert sorted(r["index"] for r in lines(predictions)) == list(range(6))
    assert sum("complete, skipped" in err for _, err in results) == 1  # the second waited, then reused


def test_pickle_only_weights_are_refused(tmp_path):
    from prunebench.models.loader import refuse_pickle_only

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match=r"pickle weights only \(pytorch_model.bin\); prunebench loads safetensors"):
        refuse_pickle_only(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    refuse_pickle_only(tmp_path)  # safetensors present: from_pretrained(use_safetensors=True) reads only those


def test_a_real_size_build_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    from prunebench.models import loader

    monkeypatch.setattr(loader, "free_bytes", lambda device: 20 * 1024 ** 3)
    cfg = {"name": "llava15", "family": "llava", "arch": "llava-1.5-7b", "weights": "random", "dtype": "float32"}
    with pytest.raises(UserError, match=r"26\.3 GiB in float32, but 20\.0 GiB is free on cpu; model.dtype=bfloat16"):
        loader.load_model(cfg, torch.device("cpu"))
    monkeypatch.setattr(loader, "free_bytes", lambda device: 4 * 1024 ** 3)
    with pytest.raises(UserError, match="no dtype fits"):
        loader.load_model(cfg, torch.device("cpu"))


def test_a_record_carries_its_key_and_the_report_reads_keyless_records(tiny_path, tmp_path):
    from prunebench.report import collect

    path = runner.run(config(tiny_path, tmp_path, "method=vanilla"), quiet=True)
    rec = load_record(path)
    assert rec.key["method"] == {"name": "vanilla", "params": {}, "positions": rec.positions}
    data = json.loads(path.read_text())
    del data["key"], data["flags"]  # a record written before job keys
    Path(path).write_text(json.dumps(data))
    assert [r.method for r in collect(tmp_path)] == ["vanilla"]


def test_a_layer_out_of_range_is_refused_before_the_model_loads(tiny_path, tmp_path, monkeypatch):
    from prunebench.models import loader

    assert loader.decoder_layer_count({"path": str(tiny_path)}) == 4
    assert loader.decoder_layer_count({"weights": "random", "arch": "llava-1.5-7b"}) == 32

    def no_load(*args):
        raise AssertionError("the model was loaded")

    from prunebench import jobs

    monkeypatch.setattr(jobs, "resident_model", no_load)  # neither loaded nor taken from this process's cache
    with pytest.raises(UserError, match=r"fastv: layer must be in 1\.\.3 for this model \(4 decoder layers\), got 9"):
        runner.run(config(tiny_path, tmp_path, "method=fastv", "method.params.layer=9"), quiet=True)
    assert not list(tmp_path.rglob("record.json"))
