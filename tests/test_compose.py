"""`method=compose`: stage planning (keeps, order, one-line errors), the CLI check, and the contract
on every family: stages at keep=1.0 are the unpruned model, per-stage counts are exact, the model is
restored, cached decode equals a full recompute."""

from __future__ import annotations

import pytest
import torch

from prunebench.cli import check_overrides
from prunebench.errors import UserError
from prunebench.methods import resolve_method
from prunebench.methods.base import n_keep_for
from prunebench.methods.compose import plan_stages
from prunebench.stages import install

PIPELINES = {
    "pre+intra": [{"name": "random_pre"}, {"name": "fastv"}],
    "vision+intra": [{"name": "tome"}, {"name": "fastv"}],
}
# FastV's row is the last token's, so a full recompute of a longer sequence decides differently
# (as in test_contract's SUFFIX_FREE): the decode check runs the same pipelines with random_intra.
SUFFIX_FREE = {name: [stages[0], {"name": "random_intra"}] for name, stages in PIPELINES.items()}


def compose(stages: list[dict], keeps: list[float | None] | None = None):
    if keeps is not None:
        stages = [{**s, "keep": k} for s, k in zip(stages, keeps, strict=True)]
    return resolve_method("compose", {"stages": stages})


def test_null_keeps_share_the_top_level_keep():
    plan = plan_stages(PIPELINES["pre+intra"], 0.111)
    assert [p.method.name for p in plan] == ["random_pre", "fastv"]
    assert [p.keep for p in plan] == pytest.approx([0.111**0.5] * 2)
    plan = plan_stages([{"name": "random_pre", "keep": 0.5}, {"name": "fastv"}], 0.25)
    assert [p.keep for p in plan] == pytest.approx([0.5, 0.5])
    plan = plan_stages([{"name": "random_pre", "keep": 0.333}, {"name": "fastv", "keep": 0.333,
                                                                  "params": {"layer": 3}}], 0.111)
    assert plan[1].method.params["layer"] == 3 and plan[1].keep == 0.333


@pytest.mark.parametrize(
    ("stages", "keep", "message"),
    [
        ([{"name": "random_pre", "keep": 0.5}, {"name": "fastv", "keep": 0.5}], 0.111, "multiply to 0.250"),
        ([{"name": "fastv"}, {"name": "random_pre"}], 0.25, "distinct and in order"),
        ([{"name": "fastv"}, {"name": "random_intra"}], 0.25, "distinct and in order"),
        ([{"name": "fastvv"}], 0.25, "unknown method 'fastvv'"),
        ([{"name": "vanilla"}], 0.25, "not a vision, pre-LLM or intra-LLM method"),
        ([{"name": "compose"}], 0.25, "not a vision, pre-LLM or intra-LLM method"),
        ([{"name": "fastv", "params": {"window": 3}}], 0.25, "has no parameter(s) window"),
        ([{"name": "fastv", "rate": 3}], 0.25, "unknown key(s) rate"),
        ([{"name": "fastv", "keep": 2}], 0.25, "keep must be a fraction"),
        ([{"name": "tome"}, {"name": "random_pre"}], 0.25, "vision stage followed by a pre-LLM stage"),
        ([{"name": "random_pre", "keep": 0.1}, {"name": "fastv"}], 0.5, "more than the given stage keeps allow"),
        ([], 0.25, "non-empty list"),
    ],
)
def test_bad_pipelines_are_one_line_errors(stages, keep, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        plan_stages(stages, keep)
    assert "\n" not in str(err.value)


def test_cli_checks_stage_names_params_and_keeps():
    ok = "[{name: random_pre, keep: 0.333}, {name: fastv, keep: 0.333}]"
    check_overrides(["method=compose", f"method.params.stages={ok}", "keep=0.111"])
    with pytest.raises(UserError, match="multiply to 0.111"):
        check_overrides(["method=compose", f"method.params.stages={ok}", "keep=0.5"])
    with pytest.raises(UserError, match="unknown method 'fastvv'"):
        check_overrides(["method=compose", "method.params.stages=[{name: random_pre}, {name: fastvv}]"])
    with pytest.raises(UserError, match="has no parameter"):
        check_overrides(["method=compose", "method.params.stages=[{name: fastv, params: {window: 3}}]"])


def skip_unsupported(fam, pipeline: str) -> None:
    if pipeline == "vision+intra" and (fam.seams.vision_hand_on is not None or
                                       (fam.seams.merge_layer_class is None and fam.seams.vision_driver is None)):
        pytest.skip(f"vision stage on {fam.family}: per-view/per-frame hand-on, tested in its own files")


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_stages_at_keep_one_are_the_unpruned_model(fam, pipeline):
    from test_contract import generate, prefill_logits

    skip_unsupported(fam, pipeline)
    inputs = fam.inputs()
    ref_logits, ref_tokens = prefill_logits(fam.model, inputs), generate(fam.model, inputs)
    for method in (compose(PIPELINES[pipeline], [1.0, 1.0]), compose(PIPELINES[pipeline])):
        with install(fam.seams, method, keep=1.0, seed=0) as inst:
            logits, tokens = prefill_logits(fam.model, inputs), generate(fam.model, inputs)
        assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
        assert [s["method"] for s in inst.stage_counts] == [s["name"] for s in PIPELINES[pipeline]]


def first_stage_alone(fam, stage: dict, keep: float, inputs) -> int:
    """Visual tokens entering the LLM when the first stage runs on its own (an independent count)."""
    from test_contract import prefill_logits

    with install(fam.seams, resolve_method(stage["name"]), keep=keep, seed=0) as inst:
        prefill_logits(fam.model, inputs)
    return inst.counts.n_visual_out


@pytest.mark.parametrize("keeps", [(0.5, 0.5), (0.25, 0.8)])
@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_counts_per_stage_are_exact(fam, pipeline, keeps):
    from test_contract import fixed_tokens, generate, layer_lengths, prefill_logits

    skip_unsupported(fam, pipeline)
    stages = PIPELINES[pipeline]
    method = compose(stages, list(keeps))
    inputs = fam.inputs()
    full, n_in = inputs["input_ids"].shape[1], fam.n_visual(inputs)
    if pipeline == "pre+intra":
        fixed = fixed_tokens(fam, inputs)
        n_mid = n_keep_for(keeps[0], n_in - fixed)[0] + fixed
    else:
        n_mid = first_stage_alone(fam, stages[0], keeps[0], inputs)
    n_out = n_keep_for(keeps[1], n_mid)[0]
    with install(fam.seams, method, keep=keeps[0] * keeps[1], seed=0) as inst:
        lengths = layer_lengths(fam, lambda: prefill_logits(fam.model, inputs))
        generate(fam.model, inputs)
    k, n_layers = resolve_method("fastv").params["layer"], len(lengths)
    assert lengths == [full - n_in + n_mid] * k + [full - n_in + n_out] * (n_layers - k)
    first, second = inst.stage_counts
    assert (first["n_visual_in"], first["n_visual_out"]) == (n_in, n_mid)
    assert (second["n_visual_in"], second["n_visual_out"]) == (n_mid, n_out)
    assert (inst.counts.n_visual_in, inst.counts.n_visual_out) == (n_in, n_out)
    assert inst.counts.layer_avg == pytest.approx((k * n_mid + (n_layers - k) * n_out) / n_layers)


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_restored_deterministic_and_cached_decode_equals_recompute(fam, fam_path, pipeline):
    from conftest import load_tiny
    from test_contract import GEN, _uncached_greedy, generate, hooks_left, prefill_logits

    skip_unsupported(fam, pipeline)
    fresh, used = load_tiny(fam_path, family=fam.family), load_tiny(fam_path, family=fam.family)
    inputs = used.inputs()
    generate(used.model, inputs)  # transformers installs its own capture hooks lazily
    hooks, classes = hooks_left(used.model), [type(m) for m in used.model.modules()]
    method = compose(SUFFIX_FREE[pipeline], [0.5, 0.5])
    runs = []
    for _ in range(2):
        with install(used.seams, method, keep=0.25, seed=0) as inst, torch.no_grad():
            out = used.model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
            ids, logits = _uncached_greedy(used.model, inputs, GEN["max_new_tokens"], inst)
        runs.append(out.sequences)
        assert torch.equal(out.sequences, ids)
        torch.testing.assert_close(torch.stack(out.logits, 1), logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(runs[0], runs[1])
    assert hooks_left(used.model) == hooks and [type(m) for m in used.model.modules()] == classes
    assert torch.equal(prefill_logits(used.model, inputs), prefill_logits(fresh.model, inputs))


def test_record_lists_every_stage(tiny_path, tmp_path):
    from test_runner import config

    from prunebench import runner
    from prunebench.record import load_record

    stages = "[{name: random_pre, keep: 0.5}, {name: fastv, keep: 0.5}]"
    path = runner.run(config(tiny_path, tmp_path, "method=compose", f"method.params.stages={stages}",
                             "keep=0.25", "limit=2"), quiet=True)
    record = load_record(path)  # a schema_version 1 reader loads it
    assert record.method == "compose" and record.stage == "pipeline" and record.keep == 0.25
    assert [s["name"] for s in record.method_card["stages"]] == ["random_pre", "fastv"]
    assert record.method_card["stages"][1]["params"] == {"layer": 2}
    first, second = record.tokens["stages"]
    assert (first["n_visual_in"], first["n_visual_out"]) == (36, 18)
    assert (second["n_visual_in"], second["n_visual_out"]) == (18, 9)
    assert record.tokens["n_visual_out"] == 9
    with pytest.raises(UserError, match="multiply to 0.250"):
        runner.run(config(tiny_path, tmp_path, "method=compose", f"method.params.stages={stages}", "keep=0.111"),
                   quiet=True)
