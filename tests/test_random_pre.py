"""random_pre's `order`: raster hands the LLM the kept tokens ascending, shuffled in the draw's order
(UniPruneBench's InternVL path, `vit_embeds[perm[:k]]` in the first k image slots); both keep the same
tokens for a seed, and keep=1.0 is the unpruned model under either order."""

from __future__ import annotations

import pytest
import torch
from conftest import llm_input

from prunebench.errors import UserError
from prunebench.methods import resolve_method
from prunebench.stages import install


def image_block(tiny, inputs) -> tuple[int, int]:
    rows = torch.isin(inputs["input_ids"][0], torch.tensor(tiny.seams.image_token_ids)).nonzero()[:, 0]
    assert rows.tolist() == list(range(int(rows[0]), int(rows[0]) + rows.numel()))
    return int(rows[0]), rows.numel()


@pytest.mark.parametrize("seed", [0, 3])
def test_llm_reads_the_kept_tokens_in_draw_order(tiny, seed):
    inputs = tiny.inputs()
    start, n = image_block(tiny, inputs)
    vanilla = llm_input(tiny, inputs)["embeds"][0, start:start + n]  # [N, D] projector output
    keep = 0.5
    k = round(keep * n)
    drawn = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]  # the official perm[:k]
    assert not torch.equal(drawn, drawn.sort().values)

    shuffled = llm_input(tiny, inputs, resolve_method("random_pre", {"order": "shuffled"}), keep, seed)
    raster = llm_input(tiny, inputs, resolve_method("random_pre"), keep, seed)
    for got, order in ((shuffled, drawn), (raster, drawn.sort().values)):
        embeds = got["embeds"][0]
        assert embeds.shape[0] == inputs["input_ids"].shape[1] - (n - k)
        torch.testing.assert_close(embeds[start:start + k], vanilla[order], rtol=0, atol=0)
        assert got["pos"][0].tolist() == list(range(embeds.shape[0]))  # contiguous, by slot


def test_shuffled_keeps_the_raster_set(tiny):
    """The two orders differ only in where the kept tokens sit: same rows kept, same count."""
    inputs = tiny.inputs()
    kept = {}
    for order in ("raster", "shuffled"):
        with install(tiny.seams, resolve_method("random_pre", {"order": order}), keep=0.25, seed=5) as inst:
            with torch.no_grad():
                tiny.model(**inputs)
            kept[order] = (inst.state.entry.index.clone(), inst.counts.n_visual_out)
    assert torch.equal(kept["raster"][0], kept["shuffled"][0]) and kept["raster"][1] == kept["shuffled"][1]


@pytest.mark.parametrize("order", ["raster", "shuffled"])
def test_keep_one_is_vanilla_under_either_order(tiny, order):
    inputs = tiny.inputs()
    with torch.no_grad():
        ref = tiny.model(**inputs).logits
    with install(tiny.seams, resolve_method("random_pre", {"order": order}), keep=1.0, seed=0), torch.no_grad():
        got = tiny.model(**inputs).logits
    assert torch.equal(got, ref)


@pytest.mark.parametrize("bad", ["Shuffled", "random", 1, None])
def test_bad_order_is_one_line(bad):
    """Refused when the method is resolved, before anything loads."""
    with pytest.raises(UserError, match=r"^random_pre: method.params.order must be one of: raster, shuffled, got .+$"):
        resolve_method("random_pre", {"order": bad})


def test_card_states_rounding_and_order():
    card = resolve_method("random_pre").describe()
    assert card["params"] == {"order": "raster"}
    text = " ".join(card["deviations"])
    for fact in ("int(keep*N)", "round-half-up(keep*N)", "random-permutation order", "order=shuffled"):
        assert fact in text
