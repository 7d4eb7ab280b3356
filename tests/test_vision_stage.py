"""EvoPrune inside CLIP on the tiny LLaVA: the schedule is what runs, [CLS] survives, tokens enter
the LLM in raster order of their representatives."""

from __future__ import annotations

import pytest
import torch

from prunebench.methods import resolve_method
from prunebench.stages import install


def encoder_lengths(tiny, fn) -> list[int]:
    seen: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]),
                                             with_kwargs=True)
             for layer in tiny.model.model.vision_tower.encoder.layers]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("merge_point", ["attention", "layer"])
def test_tokens_entering_each_clip_layer_follow_the_schedule(tiny, merge_point):
    inputs = tiny.inputs()
    for schedule in ("skip", "mean", "first[2]", "last[3]", "increasing[1]", "decreasing[2]"):
        method = resolve_method("evoprune", {"schedule": schedule, "merge_point": merge_point})
        with install(tiny.seams, method, keep=0.25, seed=0) as inst:
            with torch.no_grad():
                lengths = encoder_lengths(tiny, lambda: tiny.model(**inputs))
        r = inst.schedule
        assert sum(r) == 36 - 9 and len(r) == len(tiny.seams.vision_layers) == 5
        expected = [1 + 36 - sum(r[:i]) for i in range(6)]  # [CLS] + patches entering layers 0..5
        assert lengths == expected, schedule
        if schedule == "skip":
            assert all(x == 0 for x in r[1::2])


def test_cls_survives_and_kept_tokens_are_in_raster_order(tiny):
    inputs = tiny.inputs()
    with install(tiny.seams, resolve_method("evoprune"), keep=0.25, seed=0) as inst:
        with torch.no_grad():
            tiny.model(**inputs)
    rep = inst.state.vision.rep[0]
    assert rep[0] == -1 and (rep[1:] >= 0).all()
    assert torch.equal(rep[1:], rep[1:].sort().values) and rep.shape[0] == 1 + 9
    assert torch.equal(inst.state.vision.size[0, 1:].sum(), torch.tensor(36.0))


def test_merge_point_changes_where_tokens_merge(tiny):
    """Inside the layer (before the MLP, Algorithm 1) and between layers give different features."""
    inputs = tiny.inputs()
    logits = {}
    for point in ("attention", "layer"):
        with install(tiny.seams, resolve_method("evoprune", {"merge_point": point}), keep=0.25, seed=0):
            with torch.no_grad():
                logits[point] = tiny.model(**inputs).logits[:, -1]
    assert not torch.equal(logits["attention"], logits["layer"])
