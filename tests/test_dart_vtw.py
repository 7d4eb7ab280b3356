"""DART and VTW against independent references: DART's selection == a naive re-implementation of
the official `get_retained_image_token` loop (Python sets and lists); its signals == keys and
normed hidden states recomputed from `output_hidden_states`; VTW == the LLM run without the visual
rows; the findk KL curve and the chosen K."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from prunebench.calibrate import candidate_layers, choose_layer, kl_curve, kl_divergence
from prunebench.errors import UserError
from prunebench.methods import METHODS, resolve_method
from prunebench.methods.base import SelectContext
from prunebench.methods.dart import dart, dart_budget, official_visit_order
from prunebench.methods.vtw import vtw_layer
from prunebench.stages import install


def official_loop(keys: torch.Tensor, feats: torch.Tensor, start: int, n: int, topk: int,
                  visit: str = "set") -> list[int]:
    """The official loop for one prompt, transcribed with Python sets and lists, in sequence indices:
    keys [L, C], feats [L, D] (normed), image span [start, start+n), text = everything after.
    visit="set": pivots in the official `list(indices_set)` order; "sorted": ascending (pivot_order=sequence)."""
    l1 = keys.float().abs().sum(-1).tolist()
    image = sorted(range(start, start + n), key=lambda i: -l1[i])[:4]  # topk(...).indices order
    text = sorted(range(start + n, keys.shape[0]), key=lambda i: -l1[i])[:4]
    chosen = set(image + text)
    valid = set(range(start, start + n)) - set(image)
    valid_list = list(valid)
    for item in (list(chosen) if visit == "set" else sorted(chosen)):
        sims = [-torch.nn.functional.cosine_similarity(feats[item].float(), feats[j].float(), dim=0).item()
                for j in valid_list]
        top = sorted(range(len(valid_list)), key=lambda i: -sims[i])[:topk]  # cos_sim.topk(TOKEN_TOPK)
        picks = [valid_list[i] for i in top]
        chosen.update(picks)
        valid.difference_update(picks)
        valid_list = list(valid)
    chosen.difference_update(text)
    return sorted(chosen)


def _ctx(keys: torch.Tensor, feats: torch.Tensor, start: int, n: int, n_keep: int) -> SelectContext:
    length = keys.shape[0]
    rows = torch.arange(start, start + n)
    after = torch.arange(length) >= start + n
    signals = {"layer_keys": keys[None], "normed_hidden": feats[None], "visual_rows": rows[None],
               "text_after_visual": after[None], "sequence_index": torch.arange(length)[None]}
    return SelectContext(tokens=feats[None, start:start + n], n_keep=n_keep, grid=None,
                         generator=torch.Generator(), signals=signals)


def _dart(ctx: SelectContext, pivot_order: str = "set") -> torch.Tensor:
    return dart(ctx, layer=2, pivot_image=4, pivot_text=4, pivot_order=pivot_order)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_keep", [12, 20, 29, 40])
@pytest.mark.parametrize("start", [3, 35])
def test_dart_selection_equals_official_loop(seed, n_keep, start):
    """Default pivot_order=set == the official loop (its set order); sequence == the sorted-order loop."""
    g = torch.Generator().manual_seed(seed)
    n, length = 48, start + 57
    keys, feats = torch.randn(length, 16, generator=g), torch.randn(length, 8, generator=g)
    topk = (n_keep - 4) // 8
    kept = dart(_ctx(keys, feats, start, n, n_keep), layer=2, pivot_image=4, pivot_text=4)[0]
    assert (kept + start).tolist() == official_loop(keys, feats, start, n, topk)
    assert kept.numel() == 4 + 8 * ((n_keep - 4) // 8)
    in_sequence = _dart(_ctx(keys, feats, start, n, n_keep), "sequence")
    assert (in_sequence + start).tolist() == official_loop(keys, feats, start, n, topk, visit="sorted")


def test_dart_pivot_orders_differ():
    """The two visit orders pick different tokens on some inputs (the finding of issue 13), and the set order
    is not the sorted one for these indices."""
    differ = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        start, n, length = 35, 64, 110
        keys, feats = torch.randn(length, 16, generator=g), torch.randn(length, 8, generator=g)
        ctx = _ctx(keys, feats, start, n, 36)
        differ += not torch.equal(_dart(ctx, "set"), _dart(ctx, "sequence"))
    assert differ > 0
    assert official_visit_order([40, 10, 22, 5], [99, 72, 105, 60]) != sorted([40, 10, 22, 5, 99, 72, 105, 60])


@pytest.mark.parametrize("bad", ["Set", "hash", None])
def test_dart_bad_pivot_order_is_one_line(bad):
    """Refused when the method is resolved, before anything loads."""
    with pytest.raises(UserError, match=r"^dart: method.params.pivot_order must be one of: set, sequence, got .+$"):
        resolve_method("dart", {"pivot_order": bad})


def test_dart_card_states_the_pivot_order():
    card = resolve_method("dart").describe()
    assert card["params"]["pivot_order"] == "set"
    text = " ".join(card["deviations"])
    assert "pivot_order=set (default)" in text and "pivot_order=sequence" in text
    assert "each in sequence order; the official loop" not in text  # the matched deviation is gone


def test_dart_documented_count():
    n = 576
    for k in range(12, n):
        assert dart_budget(n, k) == 4 + 8 * ((k - 4) // 8)
    assert [dart_budget(n, k) for k in (1, 3, 4, 11)] == [1, 3, 4, 4]  # k < 12: the image pivots only
    assert dart_budget(n, n) == n  # keep=1.0 keeps everything
    assert dart_budget(36, 36) == 36 and dart_budget(40, 40) == 40
    g = torch.Generator().manual_seed(0)
    keys, feats = torch.randn(70, 16, generator=g), torch.randn(70, 8, generator=g)
    for k in (1, 3, 11, 12, 30, 50):
        kept = dart(_ctx(keys, feats, 2, 50, k), layer=2, pivot_image=4, pivot_text=4)[0]
        assert kept.numel() == dart_budget(50, k) == kept.unique().numel()
    everything = dart(_ctx(keys, feats, 2, 50, 50), layer=2, pivot_image=4, pivot_text=4)[0]
    assert everything.tolist() == list(range(50))


@pytest.mark.parametrize(("image", "text"), [(0, 4), (4, -1), (2.5, 4), (0, 0)])
def test_dart_bad_pivots(image, text):
    with pytest.raises(UserError, match="pivot_image must be an integer >= 1"):
        dart_budget(100, 50, pivot_image=image, pivot_text=text)


def test_dart_signals_and_selection_on_tiny(tiny):
    """The stage hands DART layer K-1's post-RoPE keys and the normed hidden states entering K, and
    DART keeps what the official loop picks from those, recomputed here from output_hidden_states."""
    inputs = tiny.inputs()
    method = resolve_method("dart")
    k = method.params["layer"]
    seen = {}

    def spy(ctx, **params):
        seen.update(ctx.signals)
        return METHODS.get("dart").fn(ctx, **params)

    spied = dataclasses.replace(method, spec=dataclasses.replace(method.spec, fn=spy))
    with install(tiny.seams, spied, keep=0.5, seed=0) as inst, torch.no_grad():
        tiny.model(**inputs)
    kept_rows = inst.state.intra.index[0]

    lm = tiny.seams.language_model
    with torch.no_grad():
        hidden = tiny.model(**inputs, output_hidden_states=True).hidden_states
        layer = tiny.seams.decoder_layers[k - 1]
        x = layer.input_layernorm(hidden[k - 1])
        b, length, _ = x.shape
        raw = layer.self_attn.k_proj(x).view(b, length, -1, layer.self_attn.head_dim).transpose(1, 2)
        cos, sin = lm.rotary_emb(x, position_ids=torch.arange(length)[None])
        keys = apply_rotary_pos_emb(raw, raw, cos, sin)[1].transpose(1, 2).reshape(b, length, -1)
        feats = lm.norm(hidden[k])
    torch.testing.assert_close(seen["layer_keys"], keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["normed_hidden"], feats, atol=1e-5, rtol=1e-5)
    image = torch.isin(inputs["input_ids"][0], torch.tensor(tiny.seams.image_token_ids)).nonzero()[:, 0]
    start, n = int(image[0]), image.numel()
    assert image.tolist() == list(range(start, start + n)) == seen["visual_rows"][0].tolist()
    assert seen["sequence_index"][0].tolist() == list(range(inputs["input_ids"].shape[1]))
    n_keep = round(0.5 * n)
    expected = official_loop(keys[0], feats[0], start, n, (n_keep - 4) // 8)
    assert kept_rows[torch.isin(kept_rows, image)].tolist() == expected


def _kept_visual(tiny, inputs, keep: float) -> tuple[list[list[int]], list[list[int]]]:
    """Per prompt: the kept visual tokens (indices into its image block) and the sequence_index DART got for
    its visual tokens."""
    method = resolve_method("dart")
    seen = {}

    def spy(ctx, **params):
        seen.update(ctx.signals)
        return METHODS.get("dart").fn(ctx, **params)

    spied = dataclasses.replace(method, spec=dataclasses.replace(method.spec, fn=spy))
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate() gives a padded batch
    with install(tiny.seams, spied, keep=keep, seed=0) as inst, torch.no_grad():
        tiny.model(**inputs, position_ids=positions)
    image = torch.isin(inputs["input_ids"], torch.tensor(tiny.seams.image_token_ids))
    kept, index = [], []
    for b, rows in enumerate(inst.state.intra.index):
        img = image[b].nonzero()[:, 0]
        kept.append((torch.searchsorted(img, rows[torch.isin(rows, img)])).tolist())
        index.append(seen["sequence_index"][b, seen["visual_rows"][b]].tolist())
    return kept, index


def test_dart_padded_batch_visits_each_prompt_in_its_own_set_order(tiny):
    """A left-padded prompt's pivots get their unpadded indices (sequence_index), the ones its batch-1 run (the
    official setting) gives them, so its set order and its kept tokens are those it gets alone."""
    from prunebench.data.shapes import make_sample

    questions = ["What color is the background? Answer with one word.",
                 "How many shapes are in this image, and which one is the largest? Answer in a short sentence."]
    conv = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    prompts = [tiny.processor.apply_chat_template(c, add_generation_prompt=True) for c in conv]
    images = [make_sample(i, image_size=tiny.image_side).image for i in range(2)]
    tokenizer = tiny.processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # batched generation pads on the left
    try:
        batch = tiny.processor(images=images, text=prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    assert not bool(batch["attention_mask"][0, 0])  # the shorter prompt is padded in front
    alone = [_kept_visual(tiny, tiny.processor(images=im, text=p, return_tensors="pt"), 0.5)
             for im, p in zip(images, prompts, strict=True)]
    kept, index = _kept_visual(tiny, batch, 0.5)
    assert index == [one[1][0] for one in alone]
    assert kept == [one[0][0] for one in alone]


def test_vtw_layer_from_keep():
    assert [vtw_layer(keep, 32) for keep in (1.0, 0.5, 0.111, 0.01)] == [32, 16, 4, 0]
    assert vtw_layer(0.2, 32, layer=15) == 15  # an explicit layer overrides keep
    for bad in (-1, 33, 2.5, True, "3"):
        with pytest.raises(UserError, match="vtw: layer must be null"):
            vtw_layer(0.5, 32, layer=bad)


def test_vtw_bad_layer_refused_at_install(tiny):
    with pytest.raises(UserError, match=r"layer must be null .* in 0\.\.4"):
        with install(tiny.seams, resolve_method("vtw", {"layer": 99}), keep=0.5):
            pass


def _llm_entry(tiny, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs_embeds and position ids entering the LLM in a vanilla forward."""
    from conftest import llm_input

    seen = llm_input(tiny, inputs)
    return seen["embeds"], seen["pos"]


def test_vtw_at_layer_0_equals_the_llm_without_visual_rows(tiny):
    """Withdrawing at K=0 is the LLM run on the text rows only, at their original positions."""
    inputs = tiny.inputs()
    embeds, pos = _llm_entry(tiny, inputs)
    text = ~torch.isin(inputs["input_ids"][0], torch.tensor(tiny.seams.image_token_ids))
    with torch.no_grad():
        out = tiny.seams.language_model(inputs_embeds=embeds[:, text], position_ids=pos[:, text])
        expected = tiny.model.lm_head(out.last_hidden_state[:, -1])
        with install(tiny.seams, resolve_method("vtw", {"layer": 0}), keep=0.5) as inst:
            got = tiny.model(**inputs).logits[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert inst.counts.n_visual_out == 0 and inst.counts.layer_avg == 0.0


def test_kl_divergence_matches_definition():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, 7, generator=g), torch.randn(2, 7, generator=g)
    for row in range(2):
        pp, qq = p[row].softmax(-1).tolist(), q[row].softmax(-1).tolist()
        brute = sum(a * (torch.tensor(a).log() - torch.tensor(b).log()).item() for a, b in zip(pp, qq, strict=True))
        assert kl_divergence(p, q)[row].item() == pytest.approx(brute, abs=1e-6)
    assert kl_divergence(p, p).abs().max().item() < 1e-6


def test_findk_on_tiny(tiny):
    n_layers = len(tiny.seams.decoder_layers)
    layers = candidate_layers(n_layers)
    assert layers == list(range(1, n_layers))  # the tiny LLM is too shallow for the official 5..L-1
    assert candidate_layers(32) == list(range(5, 32))
    prompts = [tiny.inputs(seed=s) for s in range(2)]
    curve = kl_curve(tiny.seams, tiny.model, prompts, [*layers, n_layers])
    assert curve[n_layers] == 0.0  # K = L withdraws nothing: the same distribution
    assert all(curve[k] > 0 for k in layers)  # withdrawing the image changes the prediction
    for eta in sorted(curve.values()):
        k = choose_layer(curve, eta, n_layers)
        assert curve[k] <= eta and all(curve[j] > eta for j in curve if j < k)
    assert choose_layer({1: 0.5, 2: 0.4}, 0.1, 4) == 4  # none qualifies: withdraw nothing
