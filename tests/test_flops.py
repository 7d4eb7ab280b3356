"""FLOPs per stage: FlopCounterMode in an untimed pass, beside FastV's analytic count at each layer's length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from prunebench import (
    methods,  # noqa: F401
    runner,
)
from prunebench.cli import CONFIG_DIR
from prunebench.flops import layer_flops
from prunebench.record import load_record
from prunebench.timing import Timer


def run(tiny_path: Path, results: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_llava", "dataset=shapes", f"model.path={tiny_path}",
                                           f"results_dir={results}", "limit=3", "device=cpu", "baseline=false",
                                           "dataset.image_size=48", *overrides])
    path = runner.run(cfg, quiet=True)
    rec = load_record(path)
    return rec, [json.loads(x) for x in (path.parent / rec.predictions).read_text().splitlines()]


def test_layer_formula_is_fastv_with_the_models_shapes():
    """4nd² + 2n²d + 2ndm multiply-adds for MHA and a 2-matrix MLP; GQA shrinks k/v; a gated MLP has 3."""
    n, d, m = 10, 8, 32
    assert layer_flops(n, d, d, m, 2) == 2 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    assert layer_flops(n, d, d // 4, m, 3) == 2 * (2 * n * d * d + 2 * n * d * d // 4 + 2 * n * n * d + 3 * n * d * m)


def test_measured_prefill_matches_the_analytic_count_and_pruning_shrinks_both(tiny_path, tmp_path):
    vanilla, v_rows = run(tiny_path, tmp_path, "method=vanilla", "keep=1.0")
    pruned, p_rows = run(tiny_path, tmp_path, "method=random_pre", "keep=0.25")
    for rows in (v_rows, p_rows):
        for r in rows:
            f = r["flops"]
            assert f["llm_prefill"] == pytest.approx(f["analytic_llm_prefill"], rel=0.01)
            assert f["total"] >= f["vision"] + f["llm_prefill"] + f["decode"] and f["vision"] > 0
            assert f["layer_lengths"] == [r["llm_prompt_len"]] * len(f["layer_lengths"])
    measured = pruned.flops["llm_prefill"] / vanilla.flops["llm_prefill"]
    analytic = pruned.flops["analytic_llm_prefill"] / vanilla.flops["analytic_llm_prefill"]
    assert measured == pytest.approx(analytic, rel=0.10) and measured < 0.6
    assert pruned.flops["vision"] == vanilla.flops["vision"]  # a pre-LLM method leaves the encoder alone


def test_intra_llm_method_is_counted_at_each_layers_length(tiny_path, tmp_path):
    rec, rows = run(tiny_path, tmp_path, "method=fastv", "keep=0.25", "method.params.layer=2")
    for r in rows:
        lengths = r["flops"]["layer_lengths"]
        assert lengths[:2] == [r["prompt_len"]] * 2 and lengths[2:] == [r["prompt_len"] - 27] * (len(lengths) - 2)
    assert rec.flops["method"] > 0 and rec.flops["n_counted"] == 3


def test_counting_leaves_the_clock_as_it_was():
    timer, count = Timer("cpu"), iter(range(0, 100, 10))
    with timer.counting(lambda: next(count)):
        with timer.span("llm"):
            pass
        assert timer.spans("llm") == [10]
    with timer.span("x"):
        pass
    assert timer.spans("llm") == [] and 0 <= timer.spans("x")[0] < 1


@pytest.mark.parametrize("method, keep", [("divprune", 0.25), ("fastv", 0.25), ("evoprune", 0.5), ("dart", 0.25),
                                          ("vanilla", 1.0)])
def test_a_sample_shaped_like_a_counted_one_costs_what_a_fresh_count_says(tiny, method, keep):
    """Within a job, a sample equal to a counted one in every input shape and reported count reuses its FLOPs
    (`reused`); counted afresh on its own (a new installation, nothing to reuse), it gives the same numbers."""
    from prunebench.data.datasets import build_dataset
    from prunebench.generation import batch_inputs, generate_timed, sample_seed
    from prunebench.methods import resolve_method
    from prunebench.models.loader import LoadedModel
    from prunebench.stages import install

    loaded = LoadedModel("tiny", tiny.model, tiny.processor, tiny.seams, torch.device("cpu"), torch.float32,
                         "pretrained", "test", True)
    items = build_dataset({"kind": "shapes", "name": "shapes", "n": 6, "image_size": 48}).items()
    timer, resolved = Timer(torch.device("cpu")), resolve_method(method)
    with install(tiny.seams, resolved, keep, seed=0, timer=timer) as inst:
        rows = [generate_timed(loaded, batch_inputs(loaded, [it]), inst, timer, sample_seed(0, it.index), 4)
                for it in items]
    reused = [i for i, r in enumerate(rows) if r["flops"].get("reused")]
    assert reused, "the shapes set repeats its question templates: some samples must share a signature"
    for i in reused:
        with install(tiny.seams, resolved, keep, seed=0, timer=timer) as fresh:
            alone = generate_timed(loaded, batch_inputs(loaded, [items[i]]), fresh, timer,
                                   sample_seed(0, items[i].index), 4)
        assert not alone["flops"].get("reused")
        assert {k: v for k, v in rows[i]["flops"].items() if k != "reused"} == alone["flops"]


@pytest.mark.parametrize("method, keep", [("vanilla", 1.0), ("divprune", 0.25), ("fastv", 0.25)])
def test_the_lean_counter_counts_what_torchs_own_counter_counts(fam, method, keep, monkeypatch):
    """`TotalFlopCounter` (no module tracking, remembered decompositions) gives every span the stock
    FlopCounterMode gives, on every family, for a pre-LLM and an intra-LLM method."""
    from torch.utils.flop_counter import FlopCounterMode

    from prunebench import flops
    from prunebench.methods import resolve_method
    from prunebench.stages import install

    inputs, timer = fam.inputs(), Timer("cpu")

    def count(inst):
        inst.reseed_rows([0])
        with torch.inference_mode():
            return flops.count_flops(lambda: fam.model.generate(**inputs, max_new_tokens=3, do_sample=False),
                                     fam.seams, timer)

    with install(fam.seams, resolve_method(method), keep, seed=0, timer=timer) as inst:
        lean = count(inst)
        monkeypatch.setattr(flops, "TotalFlopCounter",
                            lambda custom_mapping: FlopCounterMode(display=False, custom_mapping=custom_mapping))
        stock = count(inst)
    assert lean == stock
    assert lean["total"] > 0 and lean["llm_prefill"] > 0
    if method == "vanilla":
        assert lean["method"] == 0
    if method == "divprune":  # its cosine-similarity matrix is a matrix product
        assert lean["method"] > 0


def test_a_job_counts_each_shape_once_across_its_paired_controls(tiny_path, tmp_path, monkeypatch):
    """The method comes off for each paired vanilla control and goes back on; the reinstalled method keeps the
    job's FLOP memo, so every distinct signature is counted once in the whole job."""
    from prunebench import generation

    keys, counts = [], []
    signature, count = generation.flops_signature, generation.count_flops
    monkeypatch.setattr(generation, "flops_signature", lambda *a: keys.append(signature(*a)) or keys[-1])
    monkeypatch.setattr(generation, "count_flops", lambda *a: counts.append(1) or count(*a))
    rec, rows = run(tiny_path, tmp_path, "method=divprune", "keep=0.25", "limit=12", "control=4")
    assert sum("control" in r for r in rows) == 4 and len(keys) == 12
    assert len(set(keys)) < len(keys), "the shapes set repeats its templates: some samples share a signature"
    assert len(counts) == len(set(keys)) == rec.flops["n_measured"]
