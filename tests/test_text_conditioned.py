"""The `text_embeddings` signal and the pre-LLM selection deferred to the LLM entry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_contract import GEN, _uncached_greedy, prefill_logits

from prunebench.methods import resolve_method
from prunebench.stages import install
from prunebench.stages.text import text_rows, unit_batch_rows
from prunebench.timing import Timer


def spied(name: str, seen: list, fn=None, **kw):
    """The method `name` with its function wrapped to record each call's context."""
    method = resolve_method(name, **kw)

    def spy(ctx, **params):
        seen.append(ctx)
        return (fn or method.spec.fn)(ctx, **params)

    return dataclasses.replace(method, spec=dataclasses.replace(method.spec, fn=spy))


def test_text_rows_follow_the_last_visual_token():
    image = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    pad = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    rows = text_rows(image, pad)
    assert rows[0].tolist() == [3, 4]  # right padding excluded
    assert rows[1].tolist() == [4, 5]  # left padding
    assert rows[2].tolist() == [0, 1, 2, 3]  # nothing follows the image: every non-visual token
    assert unit_batch_rows(image, [2, 1, 1, 2]) == [0, 1, 1, 2]


def test_signal_is_the_prompt_text_embeddings(fam):
    """Each image's text_embeddings == the LLM input embeddings of the tokens after its last visual token."""
    inputs = fam.inputs()
    seen: list = []
    with install(fam.seams, spied("cdpruner", seen), keep=0.5, seed=0):
        prefill_logits(fam.model, inputs)
    ids = inputs["input_ids"][0]
    image = torch.isin(ids, torch.tensor(fam.seams.image_token_ids))
    after = ids[int(image.nonzero()[-1, 0]) + 1 :]
    with torch.no_grad():
        want = fam.model.get_input_embeddings()(after)
    assert seen and after.numel() > 0
    for ctx in seen:
        assert torch.equal(ctx.signals["text_embeddings"][0], want)
        assert ctx.tokens.shape[-1] == want.shape[-1]


def _by_norm(ctx, **params):
    """A text-blind selection (the k largest norms), so a full recompute makes the same decision."""
    assert ctx.signals["text_embeddings"].shape[1] > 0
    return ctx.tokens.float().norm(dim=-1).topk(ctx.n_keep).indices.sort(dim=-1).values


@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_deferred_selection_cached_decode_matches_full_recompute(fam, positions):
    inputs = fam.inputs()
    seen: list = []
    method = spied("adaptive_mi", seen, fn=_by_norm, positions=positions)
    with install(fam.seams, method, keep=0.25, seed=0) as inst:
        with torch.no_grad():
            out = fam.model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
        ids, logits = _uncached_greedy(fam.model, inputs, GEN["max_new_tokens"], inst)
    assert seen
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, atol=1e-4, rtol=1e-4)


def test_selection_is_timed_as_the_method_span(tiny):
    timer = Timer()
    with install(tiny.seams, resolve_method("cdpruner"), keep=0.25, seed=0, timer=timer) as inst:
        prefill_logits(tiny.model, tiny.inputs())
    assert timer.spans("method") and inst.counts.n_visual_out < inst.counts.n_visual_in
    assert inst.state.select_at_entry is None


def test_text_changes_the_selection(tiny):
    """The question reaches the method: two questions, two kept sets (stage 1 ranks by the text)."""
    kept = []
    for question in ("What color is the background?", "Count the small red triangles near the corner."):
        seen: list = []
        method = dataclasses.replace(spied("adaptive_mi", seen), params={"stage1_ratio": 0.3})
        with install(tiny.seams, method, keep=0.1, seed=0):
            prefill_logits(tiny.model, tiny.inputs(question=question))
        kept.append(resolve_method("adaptive_mi").spec.fn(seen[0], stage1_ratio=0.3))
    assert kept[0].shape == kept[1].shape
    assert not torch.equal(kept[0], kept[1])
