"""Vision-stage merges on LLaVA-NeXT any-resolution images: per-view budgets inside CLIP, packed
rows found through the model's own packing (unpadding, newlines), the usual contract."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from prunebench.methods import resolve_method
from prunebench.methods.base import n_keep_for
from prunebench.stages import install


@pytest.fixture(scope="module")
def next_tiny(tmp_path_factory):
    from conftest import load_tiny, tiny_checkpoint

    return load_tiny(tiny_checkpoint("llava_next", tmp_path_factory), family="llava_next")


def inputs_for(tiny, width: int, height: int):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    prompt = tiny.processor.apply_chat_template(conv, add_generation_prompt=True)
    image = Image.new("RGB", (width, height), (200, 40, 40))
    image.paste((20, 20, 200), (width // 4, height // 4, width // 2, height // 2))
    return tiny.processor(images=image, text=prompt, return_tensors="pt")


def llm_length(tiny, fn) -> int:
    seen = []
    hook = tiny.seams.decoder_layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        fn()
    finally:
        hook.remove()
    return seen[0]


MERGE_METHODS = ["evoprune", "tome"]


@pytest.mark.parametrize("name", MERGE_METHODS)
@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_square_image_keeps_the_budget_of_every_view(next_tiny, keep, name):
    inputs = inputs_for(next_tiny, 96, 96)  # base view + 2x2 crops, nothing unpadded: 5 x 36 + 12 newlines
    n_in = int((inputs["input_ids"] == next_tiny.seams.image_token_ids[0]).sum())
    assert n_in == 5 * 36 + 12
    with install(next_tiny.seams, resolve_method(name), keep=keep) as inst:
        with torch.no_grad():
            length = llm_length(next_tiny, lambda: next_tiny.model(**inputs))
    expected = 5 * n_keep_for(keep, 36)[0] + 12
    assert inst.counts.n_visual_out == expected and inst.counts.n_fixed == 12
    assert length == inputs["input_ids"].shape[1] - n_in + expected


@pytest.mark.parametrize("name", MERGE_METHODS)
@pytest.mark.parametrize(("width", "height"), [(96, 96), (96, 48), (48, 96)])
def test_keep_one_identity_restore_and_cached_decode(next_tiny, width, height, name):
    from test_contract import GEN, _uncached_greedy, hooks_left

    inputs = inputs_for(next_tiny, width, height)
    method = resolve_method(name)
    with torch.no_grad():
        reference = next_tiny.model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
        hooks = hooks_left(next_tiny.model)
        with install(next_tiny.seams, method, keep=1.0):
            same = next_tiny.model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(same.sequences, reference.sequences)
        assert all(torch.equal(a, b) for a, b in zip(same.logits, reference.logits, strict=True))
        with install(next_tiny.seams, method, keep=0.5) as inst:
            out = next_tiny.model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
            ids, logits = _uncached_greedy(next_tiny.model, inputs, GEN["max_new_tokens"], inst)
        assert inst.counts.n_visual_out < inst.counts.n_visual_in
        assert torch.equal(out.sequences, ids)
        torch.testing.assert_close(torch.stack(out.logits, 1), logits, atol=1e-4, rtol=1e-4)
        assert hooks_left(next_tiny.model) == hooks and "pack_image_features" not in vars(next_tiny.model.model)
        again = next_tiny.model.generate(**inputs, **GEN)
    assert torch.equal(again, reference.sequences)
