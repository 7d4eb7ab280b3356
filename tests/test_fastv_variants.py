"""The FastV variants of papers/are-we-solving-the-right-problem.txt against independent references:
Reverse FastV (Alg. 2), Window FastV (Alg. 3), Pooling at layer K (Alg. 4), FastV_VIS (§5.1) and
the alpha balance (§6.3). Selection rules are checked against pure-Python loops on constructed
inputs; the new signals against eager attention / hidden states of the tiny LLaVA."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from prunebench.methods import METHODS, SelectContext, resolve_method
from prunebench.methods.base import n_keep_for
from prunebench.methods.fastv_window import window_fastv_select
from prunebench.methods.grid_ops import require_grid
from prunebench.methods.pooling_intra import pooling_select, window_shape
from prunebench.seams import apply_rope
from prunebench.stages import install
from prunebench.stages.attention import last_query_attention, position_query_attention

GRIDS = [(6, 6), (24, 24), (5, 7), (1, 9)]


def ctx_of(tokens: torch.Tensor, k: int, grid=None, **signals) -> SelectContext:
    return SelectContext(tokens=tokens, n_keep=k, grid=grid, generator=torch.Generator().manual_seed(0),
                         signals=signals)


def runs(size: int, parts: int) -> list[range]:
    """Near-equal cuts of range(size): the first size % parts runs are one longer."""
    base, extra = divmod(size, parts)
    out, start = [], 0
    for i in range(parts):
        length = base + (i < extra)
        out.append(range(start, start + length))
        start += length
    return out


def windows_of(h: int, w: int, m: int, n: int) -> list[list[int]]:
    """Raster token ids of each window, row-major over the m x n window grid."""
    return [[r * w + c for r in rr for c in cc] for rr in runs(h, m) for cc in runs(w, n)]


def best_first(ids, score) -> list[int]:
    return sorted(ids, key=lambda i: (-score[i], i))


# -- Reverse FastV -------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 19, 36])
def test_reverse_keeps_the_bottom_k(k: int) -> None:
    scores = torch.rand(3, 36, generator=torch.Generator().manual_seed(k)).softmax(-1)
    got = METHODS.get("fastv_reverse").fn(ctx_of(torch.zeros(3, 36, 4), k, last_query_attention=scores), layer=2)
    for b in range(3):
        row = scores[b].tolist()
        assert got[b].tolist() == sorted(sorted(range(36), key=lambda i: row[i])[:k])


# -- Window FastV --------------------------------------------------------------------------

def brute_window(score: list[float], h: int, w: int, k: int, windows: int) -> list[int]:
    wins = windows_of(h, w, min(windows, h), min(windows, w))
    means = [sum(score[i] for i in win) / len(win) for win in wins]
    base, rem = divmod(k, len(wins))
    by_mean = sorted(range(len(wins)), key=lambda j: (-means[j], j))
    chosen: list[int] = []
    for j, win in enumerate(wins):
        quota = min(base + (j in by_mean[:rem]), len(win))
        chosen += best_first(win, score)[:quota]
    rest = best_first([i for i in range(h * w) if i not in chosen], score)
    return sorted(chosen + rest[: k - len(chosen)])


@pytest.mark.parametrize("windows", [1, 2, 4, 9])
@pytest.mark.parametrize("grid", GRIDS)
def test_window_fastv_matches_per_window_loop(grid: tuple[int, int], windows: int) -> None:
    h, w = grid
    n = h * w
    scores = torch.rand(2, n, generator=torch.Generator().manual_seed(n + windows))
    for k in sorted({1, 3, n // 4, n // 2, n - 1, n} - {0}):
        got = window_fastv_select(scores, grid, k, windows)
        assert got.shape == (2, k)
        for b in range(2):
            assert got[b].tolist() == brute_window(scores[b].tolist(), h, w, k, windows), (grid, windows, k)


def test_window_fastv_spreads_over_the_grid() -> None:
    """All attention at the end of the image (FastV's position bias): each 6x6 window still keeps 4."""
    scores = torch.linspace(0, 1, 576)[None]
    kept = window_fastv_select(scores, (24, 24), 64, 4)[0]
    rows, cols = kept // 24, kept % 24
    counts = torch.zeros(4, 4, dtype=torch.long).index_put_((rows // 6, cols // 6), torch.ones_like(kept),
                                                            accumulate=True)
    assert (counts == 4).all()


def test_window_fastv_registered_method_uses_the_grid() -> None:
    scores = torch.rand(1, 36, generator=torch.Generator().manual_seed(3))
    fn = METHODS.get("fastv_window").fn
    got = fn(ctx_of(torch.zeros(1, 36, 4), 9, (6, 6), last_query_attention=scores), layer=2, windows=3)
    assert got[0].tolist() == brute_window(scores[0].tolist(), 6, 6, 9, 3)
    with pytest.raises(ValueError, match="fastv_window needs the visual tokens to form a grid"):
        fn(ctx_of(torch.zeros(1, 36, 4), 9, None, last_query_attention=scores), layer=2, windows=3)


# -- Pooling at layer K --------------------------------------------------------------------

def brute_pooling(x: torch.Tensor, h: int, w: int, k: int) -> list[int]:
    l1 = [sum(abs(v) for v in row) for row in x.double().tolist()]
    m, n = window_shape(k, h, w)
    picks = [max(win, key=lambda i: (l1[i], -i)) for win in windows_of(h, w, m, n)]
    return sorted(sorted(picks, key=lambda i: -l1[i])[:k])


@pytest.mark.parametrize("grid", GRIDS)
def test_pooling_matches_per_window_argmax(grid: tuple[int, int]) -> None:
    h, w = grid
    n = h * w
    x = torch.randn(2, n, 8, generator=torch.Generator().manual_seed(n))
    for k in sorted({1, 2, 3, n // 4, n // 3, n // 2, n - 1, n} - {0}):
        got = pooling_select(x, grid, k)
        assert got.shape == (2, k)
        for b in range(2):
            assert got[b].tolist() == brute_pooling(x[b], h, w, k), (grid, k)


@pytest.mark.parametrize(("k", "a"), [(144, 2), (64, 3), (16, 6), (576, 1)])
def test_pooling_is_algorithm_4_on_square_budgets(k: int, a: int) -> None:
    """24x24 grid, k = (24/a)^2: one max-L1 token per a x a window, exactly as Algorithm 4."""
    x = torch.randn(1, 576, 8, generator=torch.Generator().manual_seed(k))
    l1 = x[0].abs().sum(-1).view(24, 24)
    expected = []
    for i in range(0, 24, a):
        for j in range(0, 24, a):
            p = int(l1[i : i + a, j : j + a].flatten().argmax())
            expected.append((i + p // a) * 24 + j + p % a)
    assert window_shape(k, 24, 24) == (24 // a, 24 // a)
    assert pooling_select(x, (24, 24), k)[0].tolist() == sorted(expected)


@pytest.mark.parametrize("grid", [*GRIDS, (3, 11), (13, 2)])
def test_window_shape_is_exact_for_every_budget(grid: tuple[int, int]) -> None:
    h, w = grid
    for k in range(1, h * w + 1):
        m, n = window_shape(k, h, w)
        assert 1 <= m <= h and 1 <= n <= w and m * n >= k, (grid, k, m, n)


def test_grid_methods_refuse_tokens_without_a_grid() -> None:
    with pytest.raises(ValueError, match="pooling_intra needs the visual tokens to form a grid"):
        METHODS.get("pooling_intra").fn(ctx_of(torch.zeros(1, 36, 4), 9, None), layer=2)
    with pytest.raises(ValueError, match="grid 5x7 does not hold"):
        require_grid(ctx_of(torch.zeros(1, 36, 4), 9, (5, 7)), "pooling_intra")


# -- alpha balance -------------------------------------------------------------------------

def brute_alpha(attn: list[float], x: list[list[float]], last: list[float], alpha: float) -> list[float]:
    def minmax(v: list[float]) -> list[float]:
        lo, hi = min(v), max(v)
        return [(a - lo) / (hi - lo) for a in v]

    norm = math.sqrt(sum(a * a for a in last))
    cos = [sum(a * b for a, b in zip(r, last, strict=True)) / (math.sqrt(sum(a * a for a in r)) * norm) for r in x]
    return [alpha * a + (1 - alpha) * d for a, d in zip(minmax(attn), minmax([1 - c for c in cos]), strict=True)]


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_alpha_score_is_eq6_with_minmax(alpha: float) -> None:
    g = torch.Generator().manual_seed(int(alpha * 10))
    attn, x, last = torch.rand(2, 30, generator=g), torch.randn(2, 30, 6, generator=g), torch.randn(2, 6, generator=g)
    got = METHODS.get("fastv_alpha").fn(ctx_of(x, 7, last_query_attention=attn, last_token_hidden=last),
                                        layer=2, alpha=alpha)
    for b in range(2):
        score = brute_alpha(attn[b].tolist(), x[b].tolist(), last[b].tolist(), alpha)
        assert got[b].tolist() == sorted(best_first(range(30), score)[:7])


def test_alpha_one_is_fastv_and_range_is_checked() -> None:
    g = torch.Generator().manual_seed(5)
    ctx = ctx_of(torch.randn(3, 40, 6, generator=g), 11, last_query_attention=torch.rand(3, 40, generator=g),
                 last_token_hidden=torch.randn(3, 6, generator=g))
    assert torch.equal(METHODS.get("fastv_alpha").fn(ctx, layer=2, alpha=1.0), METHODS.get("fastv").fn(ctx, layer=2))
    with pytest.raises(ValueError, match="alpha must be in"):
        METHODS.get("fastv_alpha").fn(ctx, layer=2, alpha=1.5)


# -- the new signals on the tiny LLaVA -----------------------------------------------------

def test_position_query_row_equals_masked_full_attention() -> None:
    """Any query position, left padding, GQA: the row of a full causal+padding softmax, head-mean."""
    g = torch.Generator().manual_seed(0)
    b, length, heads, kv, d = 2, 9, 4, 2, 8
    q, k = torch.randn(b, length, heads * d, generator=g), torch.randn(b, length, kv * d, generator=g)
    angle = torch.arange(length)[:, None] * 0.3 ** torch.arange(d // 2)[None]
    cos, sin = torch.cat([angle.cos()] * 2, -1)[None], torch.cat([angle.sin()] * 2, -1)[None]  # batch 1
    pad = torch.ones(b, length, dtype=torch.bool)
    pad[1, :3] = False  # left padding of row 1
    query = torch.tensor([4, 7])
    got = position_query_attention(q, k, cos, sin, query, head_dim=d, scale=d**-0.5, apply_rope=apply_rope,
                                   key_mask=pad)
    qh = apply_rope(q.view(b, length, heads, d).transpose(1, 2), cos, sin)
    kh = apply_rope(k.view(b, length, kv, d).transpose(1, 2), cos, sin).repeat_interleave(heads // kv, 1)
    logits = qh @ kh.transpose(-1, -2) * d**-0.5  # [B, H, L, L]
    allowed = torch.ones(length, length).tril().bool()[None, None] & pad[:, None, None, :]
    full = logits.masked_fill(~allowed, float("-inf")).softmax(-1).mean(1)  # [B, L, L]
    expected = full[torch.arange(b), query]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got[0, 5:] == 0).all() and (got[1, :3] == 0).all()
    last = last_query_attention(q, k, cos, sin, head_dim=d, scale=d**-0.5, apply_rope=apply_rope, key_mask=pad)
    torch.testing.assert_close(last, full[:, -1], atol=1e-6, rtol=0)


def spied(name: str, seen: dict):
    method = resolve_method(name)

    def spy(ctx, **params):
        seen.update(ctx.signals, tokens=ctx.tokens, grid=ctx.grid)
        return method.spec.fn(ctx, **params)

    return dataclasses.replace(method, spec=dataclasses.replace(method.spec, fn=spy))


def kept_image_positions(inst, image: torch.Tensor) -> torch.Tensor:
    """Indices among the image tokens of the rows kept at layer K (row 0)."""
    kept = inst.state.intra.index[0]
    image_rows = image.nonzero()[:, 0]
    return torch.isin(image_rows, kept).nonzero()[:, 0]


def test_fastv_vis_row_equals_eager_attention(fam, fam_path):
    """The last VISUAL token's recomputed row at layer K-1 equals eager attention weights (1e-5)."""
    from conftest import load_tiny

    eager = load_tiny(fam_path, attn="eager", family=fam.family)
    inputs = eager.inputs()
    with torch.no_grad():
        out = eager.model(**inputs, output_attentions=True)
    k = resolve_method("fastv_vis").params["layer"]
    image = torch.isin(inputs["input_ids"][0], torch.tensor(eager.seams.image_token_ids))
    last_visual = int(image.nonzero()[-1])
    expected = out.attentions[k - 1][0, :, last_visual].float().mean(0)[image]

    seen: dict = {}
    with install(fam.seams, spied("fastv_vis", seen), keep=0.25, seed=0) as inst:
        with torch.no_grad():
            fam.model(**inputs)
    torch.testing.assert_close(seen["last_visual_query_attention"][0], expected, atol=1e-5, rtol=0)
    top = expected.topk(n_keep_for(0.25, expected.numel())[0]).indices.sort().values
    assert torch.equal(kept_image_positions(inst, image), top)


def test_fastv_vis_padded_batch_rows(tiny, tiny_path):
    """Left-padded batch: each row's query is its own last visual token; padding keys get 0."""
    from conftest import load_tiny

    from prunebench.data.shapes import make_sample

    questions = ["What color?", "How many shapes are in the picture, and what color are they?"]
    convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    prompts = [tiny.processor.apply_chat_template(c, add_generation_prompt=True) for c in convs]
    images = [make_sample(i, image_size=tiny.image_side).image for i in range(2)]
    tok = tiny.processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        inputs = tiny.processor(images=images, text=prompts, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    assert not bool(inputs["attention_mask"].all())
    eager = load_tiny(tiny_path, attn="eager")
    with torch.no_grad():
        out = eager.model(**inputs, output_attentions=True)
    seen: dict = {}
    with install(tiny.seams, spied("fastv_vis", seen), keep=0.25, seed=0):
        with torch.no_grad():
            tiny.model(**inputs)
    image = torch.isin(inputs["input_ids"], torch.tensor(tiny.seams.image_token_ids))
    for b in range(2):
        last_visual = int(image[b].nonzero()[-1])
        expected = out.attentions[1][b, :, last_visual].float().mean(0)[image[b]]
        torch.testing.assert_close(seen["last_visual_query_attention"][b], expected, atol=1e-5, rtol=0)


def test_fastv_alpha_and_pooling_on_tiny_llava_follow_eager_references(tiny, tiny_path):
    """End to end: fastv_alpha's kept set = eq. 6 on eager attention + hidden states entering layer K;
    pooling_intra's = per-window max L1 of those hidden states; alpha=1 keeps FastV's set."""
    from conftest import load_tiny

    eager = load_tiny(tiny_path, attn="eager")
    inputs = eager.inputs()
    with torch.no_grad():
        out = eager.model(**inputs, output_attentions=True, output_hidden_states=True)
    k_layer = resolve_method("fastv_alpha").params["layer"]
    image = torch.isin(inputs["input_ids"][0], torch.tensor(eager.seams.image_token_ids))
    attn = out.attentions[k_layer - 1][0, :, -1].float().mean(0)[image]
    hidden = out.hidden_states[k_layer][0]  # entering layer K
    n_keep = n_keep_for(0.25, int(image.sum()))[0]

    seen: dict = {}
    with install(tiny.seams, spied("fastv_alpha", seen), keep=0.25, seed=0) as inst:
        with torch.no_grad():
            tiny.model(**inputs)
    torch.testing.assert_close(seen["last_token_hidden"][0], hidden[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["tokens"][0], hidden[image], atol=1e-5, rtol=1e-5)
    score = brute_alpha(attn.tolist(), hidden[image].tolist(), hidden[-1].tolist(), 0.5)
    assert kept_image_positions(inst, image).tolist() == sorted(best_first(range(len(score)), score)[:n_keep])

    kept = {}
    for name, params in (("fastv", {}), ("fastv_alpha", {"alpha": 1.0})):
        with install(tiny.seams, resolve_method(name, params), keep=0.25, seed=0) as inst:
            with torch.no_grad():
                tiny.model(**inputs)
        kept[name] = kept_image_positions(inst, image)
    assert torch.equal(kept["fastv"], kept["fastv_alpha"])

    with install(tiny.seams, spied("pooling_intra", seen), keep=0.25, seed=0) as inst:
        with torch.no_grad():
            tiny.model(**inputs)
    assert seen["grid"] == tiny.seams.vision_grid
    h, w = seen["grid"]
    assert kept_image_positions(inst, image).tolist() == brute_pooling(hidden[image], h, w, n_keep)
