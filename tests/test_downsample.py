"""`method=downsample` (an input stage: the image resized before the processor) honours the contract of
tests/test_contract.py on every family with a resolution to lower: keep=1.0 is the unpruned model, the recorded
counts are what the LLM is fed (n_visual_in: the unresized image's tokens), nothing is left on the model, and
the input cache never serves resized inputs unresized or the reverse. LLaVA-1.5 refuses in one line."""

from __future__ import annotations

import types

import pytest
import torch
from test_contract import GEN, generate, hooks_left, layer_lengths, prefill_logits

from prunebench.data.items import Item
from prunebench.data.shapes import make_sample
from prunebench.errors import UserError
from prunebench.families import FAMILIES
from prunebench.methods import resolve_method
from prunebench.methods.base import n_keep_for
from prunebench.methods.downsample import choose_setting
from prunebench.stages import install
from prunebench.timing import Timer

# An image side per family big enough that a smaller one gives fewer tokens (tiny processors: Qwen 28-px merge
# units; InternVL 64-px tiles; any-res 48-px tiles).
SIDES = {"qwen2_vl": 224, "qwen2_5_vl": 224, "qwen3_vl": 256, "internvl": 128, "llava_next": 144,
         "llava_onevision": 144}


def _loaded(fam, calls: list[int] | None = None):
    from prunebench.models.loader import LoadedModel

    processor = fam.processor
    if calls is not None:
        class Counting:
            def __getattr__(self, name):
                return getattr(fam.processor, name)

            def __call__(self, *args, **kwargs):
                calls.append(1)
                return fam.processor(*args, **kwargs)

        processor = Counting()
    return LoadedModel(fam.family, fam.model, processor, fam.seams, torch.device("cpu"), torch.float32,
                       "pretrained", "test", True)


def _items(fam, n: int = 1, side: int | None = None) -> list[Item]:
    side = side or SIDES[fam.family]
    return [Item(i, make_sample(i, image_size=side).image, "What color is the background?", "red", "color")
            for i in range(n)]


def _supported(fam) -> None:
    assert (fam.seams.input_knob is None) == (FAMILIES.get(fam.family).input_knob is None)  # one knob, both places
    if fam.seams.input_knob is None:
        with pytest.raises(UserError, match="not supported on the llava family; use method=pooling_pre"):
            with install(fam.seams, resolve_method("downsample"), keep=0.5):
                pass
        pytest.skip(f"downsample is refused on {fam.family} (checked)")


def _visual(fam, inputs) -> list[int]:
    ids = torch.tensor(fam.seams.image_token_ids)
    return torch.isin(inputs["input_ids"], ids).sum(dim=1).tolist()


def test_keep_one_is_identical_to_vanilla(fam):
    from prunebench.generation import batch_inputs

    _supported(fam)
    loaded, items = _loaded(fam), _items(fam)
    vanilla = batch_inputs(loaded, items)
    ref_logits, ref_tokens = prefill_logits(fam.model, vanilla), generate(fam.model, vanilla)
    with install(fam.seams, resolve_method("downsample"), keep=1.0) as inst:
        assert inst.inputs.prepare(loaded.processor, items) is None  # nothing resized
        inputs = batch_inputs(loaded, items, inst)
        assert inputs.n_visual_unresized is None
        assert all(torch.equal(inputs[k], vanilla[k]) for k in vanilla if isinstance(vanilla[k], torch.Tensor))
        assert torch.equal(prefill_logits(fam.model, inputs), ref_logits)
        assert torch.equal(generate(fam.model, inputs), ref_tokens)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("keep", [0.5, 0.25, 0.01])
def test_recorded_counts_are_what_the_llm_is_fed(fam, keep, batch):
    """n_visual_in = the unresized image's tokens (N, counted by the processor), n_visual_out = the image tokens
    of the prompt the LLM gets (every decoder layer sees them), the attainable count nearest round(keep*N)."""
    from prunebench.generation import batch_inputs, generate_batch_timed

    _supported(fam)
    if batch > 1 and fam.family == "internvl":
        pytest.skip("internvl: one tile budget per processor call, batch_size 1 (refused before loading)")
    loaded, items = _loaded(fam), _items(fam, batch)
    vanilla = batch_inputs(loaded, items)
    n_in = _visual(fam, vanilla)
    method = resolve_method("downsample")
    with install(fam.seams, method, keep=keep) as inst:
        prepared = inst.inputs.prepare(loaded.processor, items)
        inputs = batch_inputs(loaded, items, inst)
        lengths = layer_lengths(fam, lambda: prefill_logits(fam.model, inputs))
        rows = generate_batch_timed(loaded, inputs, inst, Timer(loaded.device), [0] * batch, 3)
    n_out = _visual(fam, inputs)
    knob = FAMILIES.get(fam.family).input_knob(fam.processor, items[0].image)
    n_keep = n_keep_for(keep, n_in[0])[0]
    attainable = {knob.tokens(s) for s in range(knob.low, knob.high + 1)}
    assert n_out[0] in attainable and n_out[0] < n_in[0]
    assert abs(n_out[0] - n_keep) == min(abs(c - n_keep) for c in attainable)
    assert prepared.unresized == n_in and prepared.expected == n_out
    assert [r["n_visual_in"] for r in rows] == n_in and [r["n_visual_out"] for r in rows] == n_out
    assert [r["layer_avg"] for r in rows] == [float(n) for n in n_out]
    assert lengths == [inputs["input_ids"].shape[1]] * len(lengths)  # no compaction: the prompt is the LLM's
    assert inputs["input_ids"].shape[1] - vanilla["input_ids"].shape[1] == n_out[0] - n_in[0]


def test_cache_never_mixes_resized_and_unresized_inputs(fam):
    from prunebench.generation import batch_inputs

    _supported(fam)
    calls: list[int] = []
    loaded, items = _loaded(fam, calls), _items(fam)
    vanilla = batch_inputs(loaded, items)
    method = resolve_method("downsample")
    with install(fam.seams, method, keep=0.25) as inst:
        small = batch_inputs(loaded, items, inst)
        again = batch_inputs(loaded, items, inst)
    with install(fam.seams, method, keep=0.5) as other:
        half = batch_inputs(loaded, items, other)
    plain = batch_inputs(loaded, items)
    assert _visual(fam, small) != _visual(fam, vanilla) and _visual(fam, plain) == _visual(fam, vanilla)
    assert torch.equal(again["input_ids"], small["input_ids"]) and torch.equal(plain["input_ids"], vanilla["input_ids"])
    # vanilla, keep 0.25 and keep 0.5 (a setting of its own, or keep 0.25's: served from its entry) processed once
    same = inst.inputs.prepare(loaded.processor, items).key == other.inputs.prepare(loaded.processor, items).key
    assert len(calls) == (2 if same else 3) and loaded.inputs.hits == (3 if same else 2)
    assert torch.equal(half["input_ids"], small["input_ids"]) == same


def test_nothing_is_left_on_the_model(fam):
    _supported(fam)
    inputs = fam.inputs()
    generate(fam.model, inputs)  # transformers' own lazy hooks first
    before, classes = hooks_left(fam.model), [type(m) for m in fam.model.modules()]
    with install(fam.seams, resolve_method("downsample"), keep=0.25) as inst:
        assert inst.inputs is not None and inst.positions.value == "contiguous" and not inst.notes
    assert hooks_left(fam.model) == before and [type(m) for m in fam.model.modules()] == classes
    assert generate(fam.model, inputs).shape[1] == inputs["input_ids"].shape[1] + GEN["max_new_tokens"]


def test_llava_is_refused_before_loading_in_one_line() -> None:
    from prunebench.jobs import check_input_stage_before_loading

    job = types.SimpleNamespace(method=resolve_method("downsample"), keep=0.5)
    with pytest.raises(UserError) as err:
        check_input_stage_before_loading(job, {"model": {"family": "llava"}})
    assert "\n" not in str(err.value) and "pooling_pre" in str(err.value)
    with pytest.raises(UserError, match="batch_size=1"):
        check_input_stage_before_loading(job, {"model": {"family": "internvl"}, "batch_size": 2})
    check_input_stage_before_loading(job, {"model": {"family": "qwen2_vl"}, "batch_size": 2})


def test_other_backends_and_pipelines_refuse() -> None:
    from prunebench.methods.compose import plan_stages
    from prunebench.stages.inputs import refuse_outside_builtin

    with pytest.raises(UserError, match="built-in runner only"):
        refuse_outside_builtin(resolve_method("downsample"), "VLMEvalKit")
    with pytest.raises(UserError, match="is not a vision, pre-LLM or intra-LLM method"):
        plan_stages([{"name": "downsample"}, {"name": "fastv"}], 0.5)


def test_every_filter_is_a_pil_filter() -> None:
    from prunebench.families.resolution import RESAMPLING
    from prunebench.methods.downsample import FILTERS

    assert set(FILTERS) == set(RESAMPLING)


def test_choose_setting_picks_the_nearest_count_and_the_most_pixels_for_it() -> None:
    steps = {s: 4 * (s // 10 + 1) for s in range(1, 101)}  # counts 4, 8, ... 44 in runs of 10 settings
    tokens = steps.__getitem__
    assert tokens(choose_setting(tokens, 1, 100, 20)) == 20 and choose_setting(tokens, 1, 100, 20) == 49
    assert tokens(choose_setting(tokens, 1, 100, 22)) == 20  # a tie between 20 and 24: fewer
    assert tokens(choose_setting(tokens, 1, 100, 23)) == 24
    assert choose_setting(tokens, 1, 100, 1) == 9  # below the floor: the floor, its largest setting


def test_internvl_batch_needing_two_tile_budgets_is_refused(fam):
    from prunebench.generation import batch_inputs

    if fam.family != "internvl":
        pytest.skip("internvl's per-call tile budget")
    loaded = _loaded(fam)
    wide = Item(1, make_sample(1, image_size=64).image.resize((192, 64)), "What color?", "red", "color")
    items = _items(fam, 1) + [wide]  # a square and a 3:1 image: one tile at different budgets (3 and 1)
    with install(fam.seams, resolve_method("downsample"), keep=0.3) as inst:
        with pytest.raises(UserError, match="use batch_size=1"):
            batch_inputs(loaded, items, inst)
