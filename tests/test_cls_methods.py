"""The [CLS]-attention signal and the methods that read it (FasterVLM, VisPruner, HoloV): the signal
equals eager attention, and each selection equals a straightforward re-implementation of its card."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from prunebench.errors import UserError
from prunebench.methods import METHODS, resolve_method
from prunebench.methods.base import top_k_sorted
from prunebench.methods.cls_ops import holov_chunk_count, holov_select, vispruner_select
from prunebench.stages import install


def spy_signals(fam, name: str, keep: float = 0.25, **params) -> list[dict[str, torch.Tensor]]:
    """Run `name` on the tiny model and return the signals each image's call received."""
    method = resolve_method(name, params)
    seen: list[dict[str, torch.Tensor]] = []

    def spy(ctx, **kw):
        seen.append({k: v[0].clone() for k, v in ctx.signals.items()} | {"tokens": ctx.tokens[0].clone()})
        return method.spec.fn(ctx, **kw)

    spied = dataclasses.replace(method, spec=dataclasses.replace(method.spec, fn=spy))
    with install(fam.seams, spied, keep=keep, seed=0), torch.no_grad():
        fam.model(**fam.inputs())
    return seen


def eager_cls_rows(fam, fam_path, layer: int) -> torch.Tensor:
    """[images, N] head-mean [CLS] row over the patches from output_attentions of an eager tower."""
    from conftest import load_tiny

    eager = load_tiny(fam_path, attn="eager", family=fam.family)
    inputs = eager.inputs()
    with torch.no_grad():
        out = eager.seams.vision_tower(inputs["pixel_values"], output_attentions=True)
    return out.attentions[layer][:, :, 0, 1:].float().mean(1)


@pytest.mark.parametrize("vision_layer", [None, -1, 0])
def test_cls_row_equals_eager_attention(tiny, tiny_path, vision_layer):
    """LLaVA: the recomputed [CLS] row equals eager attention of the same CLIP layer (1e-5);
    null = attentions[-2] (the layer of vision_feature_layer=-2)."""
    layer = -2 if vision_layer is None else vision_layer
    expected = eager_cls_rows(tiny, tiny_path, layer)
    seen = spy_signals(tiny, "fastervlm", vision_layer=vision_layer)
    assert len(seen) == expected.shape[0]
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got["cls_attention"], want, atol=1e-5, rtol=0)


def test_cls_keys_are_head_mean_keys(tiny):
    """cls_keys = the head-mean k_proj output of the patches at the same layer."""
    layer = tiny.seams.vision_layers[-1]
    captured = {}
    handle = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: captured.setdefault("k", out))
    try:
        seen = spy_signals(tiny, "fastervlm")
    finally:
        handle.remove()
    attn = layer.self_attn
    k = captured["k"]
    want = k.view(k.shape[0], k.shape[1], -1, attn.head_dim).float().mean(2)[:, 1:]
    torch.testing.assert_close(seen[0]["cls_keys"], want[0], atol=1e-6, rtol=0)


def test_vision_features_are_the_projector_input(tiny):
    feats = {}
    handle = tiny.seams.visual_output.register_forward_pre_hook(lambda m, a: feats.setdefault("x", a[0]))
    try:
        seen = spy_signals(tiny, "vispruner")
    finally:
        handle.remove()
    assert torch.equal(seen[0]["vision_features"], feats["x"][0])


def test_vision_layer_out_of_range_is_refused(tiny):
    with pytest.raises(UserError, match="vision_layer must be"):
        with install(tiny.seams, resolve_method("fastervlm", {"vision_layer": 99}), keep=0.5):
            pass


def test_fastervlm_keeps_top_attention_in_order():
    attn = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3]])
    assert top_k_sorted(attn, 2).tolist() == [[1, 3]]


def test_fastervlm_on_tiny_keeps_the_top_cls_tokens(tiny):
    with install(tiny.seams, resolve_method("fastervlm"), keep=0.25, seed=0) as inst, torch.no_grad():
        tiny.model(**tiny.inputs())
    seen = spy_signals(tiny, "fastervlm")
    attn = seen[0]["cls_attention"]
    want = sorted(attn.topk(math.floor(0.25 * attn.numel() + 0.5)).indices.tolist())
    image = torch.isin(tiny.inputs()["input_ids"][0], torch.tensor(tiny.seams.image_token_ids)).nonzero()[:, 0]
    kept = inst.state.entry.index[0]
    assert (kept[torch.isin(kept, image)] - image[0]).tolist() == want


# -- VisPruner: a plain re-implementation of the card's loop -------------------------------------------
def vispruner_reference(attention: list[float], features: torch.Tensor, k: int, ratio: float) -> list[int]:
    n_imp = int(k * ratio)
    order = sorted(range(len(attention)), key=lambda i: (-attention[i], i))
    important, residual = order[:n_imp], order[n_imp:]
    unit = [f / f.norm() for f in features.double()]
    while len(residual) > k - n_imp:
        r = min(8, len(residual) - (k - n_imp))
        a, b = residual[0::2], residual[1::2]
        best = {i: max(float(unit[i] @ unit[j]) for j in b) for i in a}
        ranked = sorted(range(len(a)), key=lambda p: (-best[a[p]], p))
        residual = [a[p] for p in ranked[r:]] + b
    return sorted(important + residual)


@pytest.mark.parametrize("n,k,ratio,seed", [(40, 10, 0.5, 0), (37, 9, 0.75, 1), (64, 7, 0.0, 2), (30, 30, 0.5, 3),
                                            (50, 3, 0.5, 4)])
def test_vispruner_matches_reference(n, k, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    attention, features = torch.rand(n, generator=g), torch.randn(n, 6, generator=g)
    got = vispruner_select(attention, features, k, ratio)
    assert got.tolist() == vispruner_reference(attention.tolist(), features, k, ratio)
    assert got.numel() == k


def test_vispruner_removes_duplicates():
    """Two identical residual tokens: the dedup keeps at most one of them."""
    features = torch.eye(6)
    features[5] = features[4]
    attention = torch.tensor([0.9, 0.1, 0.2, 0.3, 0.4, 0.35])
    got = vispruner_select(attention, features, 4, 0.25).tolist()
    assert 0 in got and not {4, 5} <= set(got)


def test_vispruner_bad_ratio_is_refused(tiny):
    with pytest.raises(UserError, match="important_ratio"):
        spy_signals(tiny, "vispruner", important_ratio=1.5)


# -- HoloV: a naive loop of the official algorithm ----------------------------------------------------------
def holov_reference(tokens: torch.Tensor, attention: torch.Tensor, k: int, alpha: float) -> list[int]:
    n, eps = tokens.shape[0], 1e-6
    p = max(1, math.floor(1024 / 576 * n / k))
    p = min(p, n)
    size, extra = n // p, n % p
    chunks, start = [], 0
    for i in range(p):
        length = size + (1 if i < extra else 0)
        if length:
            chunks.append(list(range(start, start + length)))
        start += length
    scores = []
    for c in chunks:
        a = [float(attention[i]) for i in c]
        if len(c) == 1:
            scores.append(a[0])
            continue
        t = [tokens[i].double() / (tokens[i].double().norm() + eps) for i in c]
        var = []
        for i in range(len(c)):
            sims = [0.0 if i == j else float(t[i] @ t[j]) for j in range(len(c))]
            mean = sum(sims) / (len(c) - 1)
            var.append(sum((s - mean) ** 2 for s in sims) / (len(c) - 1))
        scale = (sum(abs(1e3 * x) for x in a) / len(a)) / (sum(abs(v) for v in var) / len(var) + eps)
        scores.append(sum(1e3 * x + alpha * v * scale for x, v in zip(a, var, strict=True)) / len(c))
    total = sum(scores) + eps
    budget = [math.floor(s / total * k) for s in scores]
    remaining = k - sum(budget)
    for idx in sorted(range(len(scores)), key=lambda q: -scores[q])[: max(remaining, 0)]:
        budget[idx] += 1
    kept: set[int] = set()
    for c, b in zip(chunks, budget, strict=True):
        kept |= set(sorted(c, key=lambda i: -float(attention[i]))[:b])
    rest = sorted((i for i in range(n) if i not in kept), key=lambda i: -float(attention[i]))
    kept |= set(rest[: k - len(kept)])
    return sorted(kept)


@pytest.mark.parametrize("n,k,seed", [(576, 64, 0), (100, 13, 1), (50, 50, 2), (30, 1, 3), (64, 40, 4)])
def test_holov_matches_reference(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    tokens, attention = torch.randn(n, 8, generator=g), torch.rand(n, generator=g) / n
    got = holov_select(tokens, attention, k, holov_chunk_count(n, k), 0.09)
    assert got.tolist() == holov_reference(tokens, attention, k, 0.09)
    assert got.numel() == k


def test_holov_chunk_count_is_16_at_64_of_576():
    assert holov_chunk_count(576, 64) == 16


def test_holov_budget_follows_chunk_attention():
    """A chunk with all the attention gets the whole budget."""
    tokens = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    attention = torch.zeros(32)
    attention[:8] = torch.linspace(1, 2, 8)
    assert holov_select(tokens, attention, 8, 4, 0.0).tolist() == list(range(8))


def test_methods_are_registered_pre_llm():
    for name in ("fastervlm", "vispruner", "holov"):
        assert "cls_attention" in METHODS.get(name).needs


# -- other families: InternVL (group means of the [CLS] row), Qwen (received-attention substitute) -----------
def test_internvl_cls_row_is_the_group_mean_of_eager_attention(fam, fam_path):
    """InternVL: each visual token's signal = mean eager [CLS] attention of its 4 pixel-shuffle patches."""
    if fam.family != "internvl":
        pytest.skip("InternVL only")
    from prunebench.families.internvl.vision import shuffle_groups

    rows = eager_cls_rows(fam, fam_path, -1)  # InternVL selects the last InternViT layer
    groups = shuffle_groups(fam.seams.multimodal, math.isqrt(rows.shape[1]))
    seen = spy_signals(fam, "fastervlm")
    assert len(seen) == rows.shape[0]
    for got, row in zip(seen, rows, strict=True):
        torch.testing.assert_close(got["cls_attention"], row[groups].mean(-1), atol=1e-5, rtol=0)


def qwen_received_reference(fam, block) -> torch.Tensor:
    """[U] received attention per 2x2 unit in the tower's sequence order, from a dense masked softmax."""
    store = {}

    def pre(module, args, kwargs):
        store["x"], store["kw"] = args[0] if args else kwargs["hidden_states"], kwargs

    handle = block.attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            fam.model(**fam.inputs())
    finally:
        handle.remove()
    import sys

    attn, x, kw = block.attn, store["x"], store["kw"]
    s = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, *kw["position_embeddings"])
    cu = kw["cu_seqlens"].tolist()
    segment = torch.bucketize(torch.arange(s), torch.tensor(cu[1:]), right=True)
    same = segment[:, None] == segment[None, :]
    logits = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * attn.scaling
    probs = logits.masked_fill(~same, float("-inf")).softmax(-1)  # [H, S, S]
    length = same.sum(0).double()
    received = probs.sum(dim=(0, 1)) / (attn.num_heads * length)
    m = int(fam.seams.vision_tower.spatial_merge_size) ** 2
    return received.view(-1, m).mean(1).float()


@pytest.mark.parametrize("vision_layer", [None, 0])  # the last (full-attention) block; block 0 (windowed on 2.5)
def test_qwen_substitute_is_received_attention_per_unit(fam, vision_layer):
    """Qwen (no [CLS]): mean attention received at the last block, per 2x2 unit, raster order per image;
    the raster order is checked against the model's own un-permutation (merger of the features)."""
    if fam.family not in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl"):
        pytest.skip("Qwen only")
    from transformers.vision_utils import get_vision_window_index

    visual = fam.seams.vision_tower
    seen = spy_signals(fam, "vispruner", vision_layer=vision_layer)
    inputs = fam.inputs()
    grid = inputs["image_grid_thw"]
    received = qwen_received_reference(fam, list(visual.blocks)[-1 if vision_layer is None else vision_layer])
    if getattr(visual, "fullatt_block_indexes", None) is not None:
        order, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                           window_size=visual.window_size, patch_size=visual.patch_size, kwargs={})
        raster = torch.empty_like(received)
        raster[order] = received
        received = raster
    torch.testing.assert_close(torch.cat([s["cls_attention"] for s in seen]), received, atol=1e-5, rtol=0)
    with torch.no_grad():
        pooled = visual(inputs["pixel_values"], grid_thw=grid).pooler_output
    features = torch.cat([s["vision_features"] for s in seen])
    merged = visual.merger(features.reshape(-1, features.shape[-1] // 4))
    torch.testing.assert_close(merged, pooled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("vision_layer", [None, 0])
def test_qwen_signals_per_image_in_a_two_image_call(fam, vision_layer):
    """Two images of different sizes (odd unit grids, padded windows) in one tower call get the signals
    each image gets alone: per-image split and window-order un-permutation are right."""
    if fam.family not in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl"):
        pytest.skip("Qwen only")
    from test_vision_qwen import SIZES, pixels

    method = resolve_method("vispruner", {"vision_layer": vision_layer})
    seen: list[dict[str, torch.Tensor]] = []

    def spy(ctx, **kw):
        seen.append({k: v[0].clone() for k, v in ctx.signals.items()})
        return method.spec.fn(ctx, **kw)

    spied = dataclasses.replace(method, spec=dataclasses.replace(method.spec, fn=spy))
    both, grid = pixels(fam, SIZES)
    n_rows = [int(g.prod()) for g in grid]
    with install(fam.seams, spied, keep=0.3, seed=0), torch.no_grad():
        fam.seams.vision_tower(both, grid_thw=grid)
        for px, g in zip(both.split(n_rows), grid, strict=True):
            fam.seams.vision_tower(px, grid_thw=g[None])
    together, alone = seen[:2], seen[2:]
    assert [s["cls_attention"].numel() for s in together] == [int(g.prod()) // 4 for g in grid]  # Qwen2.x: 24, 15
    for a, b in zip(together, alone, strict=True):
        for name in ("cls_attention", "cls_keys", "vision_features"):
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)
