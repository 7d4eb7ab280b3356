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
from prunebench.methods.dart import dart, dart_budget
from prunebench.methods.vtw import vtw_layer
from prunebench.stages import install


def official_loop(keys: torch.Tensor, feats: torch.Tensor, start: int, n: int, topk: int) -> list[int]:
    """The official loop for one prompt, in sequence indices: keys [L, C], feats [L, D] (normed),
    image span [start, start+n), text = everything after. Pivots visited in sorted order (see dart.py)."""
    l1 = keys.float().abs().sum(-1).tolist()
    image = sorted(range(start, start + n), key=lambda i: -l1[i])[:4]
    text = sorted(range(start + n, keys.shape[0]), key=lambda i: -l1[i])[:4]
    chosen = set(image + text)
    valid = set(range(start, start + n)) - set(image)
    for item in sorted(chosen):
        ranked = sorted(valid, key=lambda j: torch.nn.functional.cosine_similarity(
            feats[item].float(), feats[j].float(), dim=0).item())  # ascending cosine
        picks = ranked[:topk]
        chosen.update(picks)
        valid.difference_update(picks)
    chosen.difference_update(text)
    return sorted(chosen)


def _ctx(keys: torch.Tensor, feats: torch.Tensor, start: int, n: int, n_keep: int) -> SelectContext:
    length = keys.shape[0]
    rows = torch.arange(start, start + n)
    after = torch.arange(length) >= start + n
    signals = {"layer_keys": keys[None], "normed_hidden": feats[None], "visual_rows": rows[None],
               "text_after_visual": after[None]}
    return SelectContext(tokens=feats[None, start:start + n], n_keep=n_keep, grid=None,
                         generator=torch.Generator(), signals=signals)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_keep", [12, 20, 29, 40])
def test_dart_selection_equals_official_loop(seed, n_keep):
    g = torch.Generator().manual_seed(seed)
    start, n, length = 3, 48, 60
    keys, feats = torch.randn(length, 16, generator=g), torch.randn(length, 8, generator=g)
    kept = dart(_ctx(keys, feats, start, n, n_keep), layer=2, pivot_image=4, pivot_text=4)[0]
    expected = official_loop(keys, feats, start, n, (n_keep - 4) // 8)
    assert (kept + start).tolist() == expected
    assert kept.numel() == 4 + 8 * ((n_keep - 4) // 8)


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
    n_keep = round(0.5 * n)
    expected = official_loop(keys[0], feats[0], start, n, (n_keep - 4) // 8)
    assert kept_rows[torch.isin(kept_rows, image)].tolist() == expected


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
    seen = {}

    def pre(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]
        seen["pos"] = kwargs.get("position_ids")

    handle = tiny.seams.language_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            tiny.model(**inputs)
    finally:
        handle.remove()
    pos = seen["pos"] if seen["pos"] is not None else torch.arange(seen["embeds"].shape[1])[None]
    return seen["embeds"], pos


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
