"""A job end to end on the tiny LLaVA: record contents, skip, resume after a crash, failed samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from prunebench import (
    methods,  # noqa: F401
    runner,
)
from prunebench.backends import builtin
from prunebench.cli import CONFIG_DIR
from prunebench.errors import UserError
from prunebench.record import LATENCY_FIELDS, SCHEMA_VERSION, TIMED_FIELDS, load_record


def config(tiny_path: Path, results: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["model=tiny_llava", "dataset=shapes", f"model.path={tiny_path}", f"results_dir={results}", "limit=4",
                                             "device=cpu", "dataset.image_size=48", *overrides])


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_record_is_complete_and_honest(tiny_path, tmp_path):
    path = runner.run(config(tiny_path, tmp_path, "method=random_pre", "keep=0.25"), quiet=True)
    rec = load_record(path)
    assert rec.schema_version == SCHEMA_VERSION and rec.status == "complete"
    assert (rec.model, rec.dataset, rec.method, rec.stage, rec.keep) == ("tiny_llava", "shapes", "random_pre",
                                                                        "pre_llm", 0.25)
    assert rec.n_samples == 4 and rec.n_failed == 0
    assert rec.tokens["n_visual_in"] == 36 and rec.tokens["n_visual_out"] == 9
    assert rec.tokens["llm_prompt_len"] == rec.tokens["prompt_len"] - 27
    assert all(rec.timing[f] >= 0 for f in TIMED_FIELDS) and rec.timing["prefill_s"] > 0
    assert set(TIMED_FIELDS) | {"ttft_s"} <= set(rec.timing["median"]) <= set(TIMED_FIELDS) | set(LATENCY_FIELDS)
    assert rec.timing["clock"] == "perf_counter"
    assert not rec.accuracy_meaningful and "noise" in rec.notes[0]
    assert 0 <= rec.score <= 100 and set(rec.metrics) <= {"background", "existence", "count", "color", "position"}
    assert rec.versions["transformers"] and rec.config["keep"] == 0.25 and rec.method_card["source"]
    rows = lines(path.parent / rec.predictions)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert all(r["n_visual_out"] == 9 and r["error"] is None for r in rows)


def test_time_to_first_token_and_per_output_token(tiny_path, tmp_path):
    """TTFT runs from generate entry to the first token's logits: it holds the prefill forward (vision and
    method inside it) and lies within the whole call; TPOT times each decode step; the record gives the
    generated-token count and the latencies' medians."""
    import statistics

    path = runner.run(config(tiny_path, tmp_path, "method=fastv", "keep=0.25", "dataset.max_new_tokens=4"),
                      quiet=True)
    rec = load_record(path)
    rows = lines(path.parent / rec.predictions)
    for r in rows:
        t = r["timing"]
        assert t["prefill_s"] <= t["ttft_s"] <= t["total_s"]
        if r["n_new_tokens"] > 1:
            assert t["tpot_s"] == pytest.approx(t["decode_s"] / (r["n_new_tokens"] - 1))
        else:
            assert t["tpot_s"] is None
    assert rec.timing["median"]["ttft_s"] == statistics.median(r["timing"]["ttft_s"] for r in rows)
    assert rec.timing["n_new_tokens"] == sum(r["n_new_tokens"] for r in rows)


def test_vision_stage_record_has_schedule(tiny_path, tmp_path):
    rec = load_record(runner.run(config(tiny_path, tmp_path, "method=evoprune", "keep=0.25"), quiet=True))
    assert sum(rec.tokens["vision_merge_schedule"]) == 36 - 9
    assert rec.tokens["n_visual_out"] == 9 and rec.stage == "vision"


def test_complete_job_is_skipped(tiny_path, tmp_path, capsys):
    cfg = config(tiny_path, tmp_path, "method=fastv", "keep=0.5")
    path = runner.run(cfg, quiet=True)
    before = path.read_text()
    runner.run(cfg)
    assert "skipped" in capsys.readouterr().err
    assert path.read_text() == before


def test_crash_then_rerun_resumes_without_duplicates(tiny_path, tmp_path, monkeypatch):
    cfg = config(tiny_path, tmp_path, "method=random_intra", "keep=0.5", "warmup=0")
    real, calls = builtin._generate, []

    def crashing(loaded, dataset, batch, *args, **kwargs):
        calls.extend(it.index for it in batch)
        if any(it.index == 2 for it in batch):
            raise KeyboardInterrupt  # the process dies mid-run
        return real(loaded, dataset, batch, *args, **kwargs)

    monkeypatch.setattr(builtin, "_generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, quiet=True)
    job_dir = runner.Job.from_config(cfg).directory(tmp_path)
    assert load_record(job_dir / "record.json").status == "running"
    assert [r["index"] for r in lines(job_dir / "predictions.jsonl")] == [0, 1]
    monkeypatch.setattr(builtin, "_generate", real)
    rec = load_record(runner.run(cfg, quiet=True))
    assert rec.status == "complete" and rec.n_samples == 4
    assert sorted(r["index"] for r in lines(job_dir / "predictions.jsonl")) == [0, 1, 2, 3]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_failing_sample_is_recorded_and_run_goes_on(tiny_path, tmp_path, monkeypatch, batch_size):
    """A failing batch is retried a sample at a time: only the failing sample is recorded as failed."""
    real = builtin._generate

    def flaky(loaded, dataset, batch, *args, **kwargs):
        if any(it.index == 1 for it in batch):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(loaded, dataset, batch, *args, **kwargs)

    monkeypatch.setattr(builtin, "_generate", flaky)
    cfg = config(tiny_path, tmp_path, "method=divprune", "keep=0.5", f"batch_size={batch_size}")
    rec = load_record(runner.run(cfg, quiet=True))
    assert rec.status == "complete" and rec.n_samples == 4 and rec.n_failed == 1
    predictions = runner.Job.from_config(cfg).directory(tmp_path) / "predictions.jsonl"
    rows = {r["index"]: r for r in lines(predictions)}
    assert "simulated" in rows[1]["error"] and rows[0]["error"] is None
    assert [rows[i].get("batch_size") for i in (0, 2, 3)] == [1, batch_size, batch_size]
    monkeypatch.setattr(builtin, "_generate", real)  # the cause is gone: the rerun retries sample 1 only
    rec = load_record(runner.run(cfg, quiet=True))
    assert rec.n_failed == 0 and [r["index"] for r in lines(predictions)] == [0, 1, 2, 3, 1]


def test_job_directory_names_what_defines_the_result(tiny_path, tmp_path):
    base = runner.Job.from_config(config(tiny_path, tmp_path, "method=fastv", "keep=0.111"))
    where = base.directory(tmp_path)
    assert where.parent == tmp_path / "tiny_llava" / "shapes-n4" / "fastv"
    assert where.name.startswith("keep0.111-seed0-") and where.name == f"keep0.111-seed0-{base.key_hash}"
    other = runner.Job.from_config(config(tiny_path, tmp_path, "method=fastv", "keep=0.111",
                                          "method.params.layer=1"))
    assert other.directory(tmp_path).parent.name.startswith("fastv-")
    vanilla = runner.Job.from_config(config(tiny_path, tmp_path, "method=vanilla", "keep=0.3"))
    assert vanilla.keep == 1.0


def test_random_weights_runs_are_kept_apart(tiny_path, tmp_path):
    job = runner.Job.from_config(config(tiny_path, tmp_path, "method=fastv", "model.weights=random"))
    assert job.model == "tiny_llava-random" and job.directory(tmp_path).parts[-4] == "tiny_llava-random"


def test_batch_size_is_in_the_job_key(tiny_path, tmp_path):
    one, two = (runner.Job.from_config(config(tiny_path, tmp_path, f"batch_size={b}")) for b in (1, 2))
    assert one.directory(tmp_path) != two.directory(tmp_path)
    with pytest.raises(UserError, match="batch_size"):
        runner.Job.from_config(config(tiny_path, tmp_path, "batch_size=0"))


def test_qwen_record_states_the_position_policy(tmp_path, tmp_path_factory):
    from conftest import tiny_checkpoint

    path = tiny_checkpoint("qwen2_5_vl", tmp_path_factory)
    cfg = config(path, tmp_path, "model=tiny_qwen25vl", "method=random_pre", "keep=0.5", "dataset.image_size=112")
    rec = load_record(runner.run(cfg, quiet=True))
    assert rec.model == "tiny_qwen25vl" and rec.n_failed == 0
    assert rec.tokens["n_visual_in"] == 16 and rec.tokens["n_visual_out"] == 8
    assert rec.positions == "original" and any("M-RoPE" in n or "multi-axis" in n for n in rec.notes)


def test_kv_cache_bytes_follow_the_tokens_entering_the_llm(tiny_path, tmp_path):
    """KV-cache bytes are read from the cache object: after prefill they are the vanilla bytes scaled by the
    sequence entering the LLM (a pre-LLM method shortens every layer alike); an intra-LLM method keeps layers
    below K full; decoding adds one row per generated token but the last."""
    base = load_record(runner.run(config(tiny_path, tmp_path, "method=vanilla", "keep=1.0"), quiet=True))
    pre_path = runner.run(config(tiny_path, tmp_path, "method=random_pre", "keep=0.25"), quiet=True)
    pre = load_record(pre_path)
    ratio = pre.memory["kv_bytes_prefill"] / base.memory["kv_bytes_prefill"]
    assert ratio == pytest.approx(pre.tokens["llm_prompt_len"] / base.tokens["llm_prompt_len"])
    per_layer = pre.memory["kv_layer_bytes_prefill"]
    assert len(per_layer) == 4 and len(set(per_layer)) == 1
    for r in lines(pre_path.parent / pre.predictions):
        grown = sum(r["kv_layer_bytes_end"]) / sum(r["kv_layer_bytes_prefill"])
        assert grown == pytest.approx((r["llm_prompt_len"] + r["n_new_tokens"] - 1) / r["llm_prompt_len"])
    fastv = load_record(runner.run(config(tiny_path, tmp_path, "method=fastv", "keep=0.25",
                                          "method.params.layer=2"), quiet=True))
    full, pruned = fastv.memory["kv_layer_bytes_prefill"][:2], fastv.memory["kv_layer_bytes_prefill"][2:]
    assert full == base.memory["kv_layer_bytes_prefill"][:2] and max(pruned) < min(full)


def test_paired_vanilla_control_runs_in_the_same_process(tiny_path, tmp_path):
    """control=2 of 4 samples: those samples also run unpruned, interleaved (after, then before the method);
    the record's paired ratios are medians of vanilla / method over exactly those pairs."""
    import statistics

    path = runner.run(config(tiny_path, tmp_path, "method=random_pre", "keep=0.25", "control=2"), quiet=True)
    rec = load_record(path)
    rows = lines(path.parent / "predictions.jsonl")
    controlled = [r for r in rows if r.get("control")]
    assert [r["index"] for r in controlled] == [0, 2]
    assert [r["control"]["order"] for r in controlled] == ["after", "before"]
    paired = rec.timing["paired"]
    assert paired["n_pairs"] == 2 and paired["n_samples"] == 2
    expected = statistics.median(r["control"]["timing"]["prefill_s"] / r["timing"]["prefill_s"] for r in controlled)
    assert paired["vanilla_over_method"]["prefill_s"] == pytest.approx(expected)
    # the unpruned control generates what the vanilla job generates
    vanilla = runner.run(config(tiny_path, tmp_path, "method=vanilla"), quiet=True)
    assert [r["n_new_tokens"] for r in lines(vanilla.parent / "predictions.jsonl")][::2] == \
        [r["control"]["n_new_tokens"][0] for r in controlled]
    assert load_record(vanilla).timing["paired"] == {}  # vanilla runs no control of itself


def test_control_batches_are_spread_evenly():
    assert builtin.control_batches(10, 4) == [0, 2, 5, 7]
    assert builtin.control_batches(3, 8) == [0, 1, 2]
    assert builtin.control_batches(5, 0) == []


def test_flags_raised_after_a_paired_control_reach_the_record(tiny_path, tmp_path):
    """A control takes the method off and puts a new installation on; a flag its intra-LLM stage raises then
    (here: from the second prefill on, i.e. never in the first installation) is in the record."""
    from prunebench.methods import METHODS

    spec, calls = METHODS.get("fastv"), []
    original = spec.unreachable_budget

    def late(*args):
        calls.append(1)
        return "budget unreachable: raised late" if len(calls) >= 2 else None

    object.__setattr__(spec, "unreachable_budget", late)  # the spec is frozen; restored below
    try:
        path = runner.run(config(tiny_path, tmp_path, "method=fastv", "keep=0.25", "control=2"), quiet=True)
    finally:
        object.__setattr__(spec, "unreachable_budget", original)
    assert len(calls) >= 2
    assert load_record(path).flags == ["budget unreachable: raised late"]
