"""Fidelity of the [CLS]-attention merge algorithms (VisionZip, PruMerge, PruMerge+) against naive
loops written from the papers' definitions and the official code's loop semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prunebench.methods.prumerge_ops import (
    extra_slot,
    iqr_outlier_count,
    prumerge_merge,
    prumerge_plus_select,
    prumerge_select,
)
from prunebench.methods.visionzip_ops import visionzip_merge, visionzip_split


def _toy(b: int = 2, n: int = 40, d: int = 6, dk: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    attn = torch.rand(b, n, generator=g, dtype=torch.float64).softmax(dim=1)
    keys = torch.randn(b, n, dk, generator=g, dtype=torch.float64)
    return x, attn, keys


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v / (u.norm() * v.norm()))


# -- VisionZip -------------------------------------------------------------------------------------
def visionzip_reference(x, attn, keys, n_dom: int, n_ctx: int) -> dict[int, torch.Tensor]:
    """One image, loops: slot -> output value (dominant: itself; contextual: target + mean)."""
    n = x.shape[0]
    ranked = sorted(range(n), key=lambda i: -float(attn[i]))
    dominant = set(ranked[:n_dom])
    out = {i: x[i] for i in dominant}
    rest = [i for i in range(n) if i not in dominant]
    if n_ctx == 0:
        return out
    step = max(1, len(rest) // n_ctx)
    targets = [rest[p] for p in range(0, len(rest), step)][:n_ctx]
    groups: dict[int, list[int]] = {t: [] for t in targets}
    for i in rest:
        if i in groups:
            continue
        best = max(targets, key=lambda t: _cos(keys[i], keys[t]))
        groups[best].append(i)
    for t, members in groups.items():
        mean = sum((x[i] for i in members), torch.zeros_like(x[t])) / max(1, len(members))
        out[t] = x[t] + mean
    return out


@pytest.mark.parametrize("k", [1, 7, 13, 40])
def test_visionzip_matches_loop_reference(k):
    x, attn, keys = _toy()
    n_dom, n_ctx = visionzip_split(k)
    index, tokens = visionzip_merge(x, attn, keys, n_dom, n_ctx)
    assert index.shape == (2, k) and tokens.shape == (2, k, x.shape[-1])
    for b in range(2):
        ref = visionzip_reference(x[b], attn[b], keys[b], n_dom, n_ctx)
        assert index[b].tolist() == sorted(ref)
        for slot, value in zip(index[b].tolist(), tokens[b], strict=True):
            torch.testing.assert_close(value, ref[slot])


def test_visionzip_dominant_and_contextual_counts():
    x, attn, keys = _toy(n=64)
    index, tokens = visionzip_merge(x, attn, keys, 10, 4)
    unchanged = (tokens == x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))).all(dim=2)
    top = set(attn[0].topk(10).indices.tolist())
    assert top <= set(index[0].tolist())
    # the 10 dominant tokens keep their values; the 4 contextual ones absorb their groups
    assert int(unchanged[0].sum()) == 10


def test_visionzip_official_splits():
    assert [visionzip_split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]


def test_visionzip_keep_all_is_identity():
    x, attn, keys = _toy()
    index, tokens = visionzip_merge(x, attn, keys, *visionzip_split(40))
    assert index[0].tolist() == list(range(40))
    assert torch.equal(tokens, x)


# -- PruMerge --------------------------------------------------------------------------------------
def prumerge_reference(x, attn, keys, kept: list[int], m: int = 32):
    """One image, the official loop: for each kept i, neighbours among [other kept, pruned]."""
    n = x.shape[0]
    pruned = [j for j in range(n) if j not in kept]
    merged = {}
    for i in kept:
        rest = [j for j in kept if j != i] + pruned
        sims = sorted(rest, key=lambda j: -_cos(keys[i], keys[j]))[: min(m, n - 1)]
        merged[i] = x[i] + sum(attn[j] * x[j] for j in sims)
    extra = sum(attn[j] * x[j] for j in pruned)
    return merged, extra


@pytest.mark.parametrize("k,m", [(5, 32), (12, 32), (12, 3), (39, 32)])
def test_prumerge_merge_matches_official_loop(k, m):
    x, attn, keys = _toy()
    kept = prumerge_select(attn, k)
    merged, extra = prumerge_merge(x, attn, keys, kept, n_neighbours=m)
    for b in range(2):
        ref, ref_extra = prumerge_reference(x[b], attn[b], keys[b], kept[b].tolist(), m)
        for slot, value in zip(kept[b].tolist(), merged[b], strict=True):
            torch.testing.assert_close(value, ref[slot])
        torch.testing.assert_close(extra[b], ref_extra)


def test_prumerge_select_is_top_k_by_attention():
    _, attn, _ = _toy()
    kept = prumerge_select(attn, 9)
    assert kept[0].tolist() == sorted(np.argsort(-attn[0].numpy())[:9].tolist())


def test_iqr_count_matches_numpy_percentiles():
    g = torch.Generator().manual_seed(3)
    attn = torch.rand(3, 576, generator=g) ** 8  # heavy tail: outliers exist
    for row, count in zip(attn, iqr_outlier_count(attn).tolist(), strict=True):
        a = row.numpy().astype(np.float64)
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        assert count == int((a > q3 + 1.5 * (q3 - q1)).sum()) > 0


@pytest.mark.parametrize("k", [3, 20, 60])
def test_prumerge_plus_select_outliers_then_uniform(k):
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(1, 100, generator=g, dtype=torch.float64) ** 8
    kept = prumerge_plus_select(attn, k)[0].tolist()
    a = attn[0].numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    n_out = min(int((a > q3 + 1.5 * (q3 - q1)).sum()), k)
    top = set(np.argsort(-a)[:n_out].tolist())
    assert len(kept) == len(set(kept)) == k and top <= set(kept)
    free = [i for i in range(100) if i not in top]
    fill = [free[math.floor((j + 0.5) * len(free) / (k - n_out))] for j in range(k - n_out)]
    assert sorted(top | set(fill)) == kept


def test_extra_slot_is_last_pruned_patch():
    kept = torch.tensor([[0, 5, 9], [1, 2, 3]])
    assert extra_slot(kept, 10).tolist() == [8, 9]


def test_full_width_cls_row_is_single_head_softmax():
    from prunebench.stages.vision_signals import full_width_cls_row

    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 9, 12, generator=g), torch.randn(2, 9, 12, generator=g)
    row, keys = full_width_cls_row(q, k)
    for b in range(2):
        logits = [float(q[b, 0] @ k[b, j]) / math.sqrt(12) for j in range(9)]
        ref = torch.tensor(logits).softmax(0)[1:]
        torch.testing.assert_close(row[b], ref)
        assert torch.equal(keys[b], k[b, 1:])


@pytest.mark.parametrize("share", [0.0, 0.5, 0.99])
def test_visionzip_any_share_matches_loop_reference(share):
    x, attn, keys = _toy(b=1)
    for k in (1, 2, 9):
        n_dom, n_ctx = visionzip_split(k, share)
        assert n_dom + n_ctx == k and n_dom >= 0
        index, tokens = visionzip_merge(x, attn, keys, n_dom, n_ctx)
        ref = visionzip_reference(x[0], attn[0], keys[0], n_dom, n_ctx)
        assert index[0].tolist() == sorted(ref)
        torch.testing.assert_close(tokens[0], torch.stack([ref[s] for s in sorted(ref)]))


def _official_vispruner_dup(attention: torch.Tensor, feats: torch.Tensor, k: int, ratio: float) -> torch.Tensor:
    """Theia-4869/VisPruner llava_arch.py encode_images, transcribed for one image: the cosine in the
    features' own dtype (stable sorts, as our declared tie rule)."""
    n_imp = int(k * ratio)
    order = attention.argsort(descending=True, stable=True)
    important, residual = order[:n_imp], order[n_imp:]
    unit = feats / feats.norm(dim=-1, keepdim=True)
    while (r := min(8, residual.numel() - (k - n_imp))) > 0:
        a, b = residual[::2], residual[1::2]
        best = (unit[a] @ unit[b].T).max(dim=-1).values
        residual = torch.cat([a[best.argsort(descending=True, stable=True)[r:]], b])
    return torch.cat([important, residual]).sort().values


def test_vispruner_scores_in_the_feature_dtype_by_default() -> None:
    """Issue 13: bf16 features are scored in bf16 (official); fp32=True is the former upcast."""
    from prunebench.methods.cls_ops import vispruner_select

    differs = 0
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        att, feats = torch.rand(96, generator=g), torch.randn(96, 8, generator=g).to(torch.bfloat16)
        ours = vispruner_select(att, feats, 24, 0.5)
        assert torch.equal(ours, _official_vispruner_dup(att, feats, 24, 0.5))
        fp32 = vispruner_select(att, feats, 24, 0.5, fp32=True)
        assert torch.equal(fp32, _official_vispruner_dup(att, feats.float(), 24, 0.5))
        differs += not torch.equal(ours, fp32)
    assert differs > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vispruner_precomputed_cosines_pick_as_the_per_iteration_gemm(dtype, monkeypatch) -> None:
    """The one-matrix path and the official per-iteration GEMM path keep the same tokens (many sizes and widths)."""
    from prunebench.methods import cls_ops

    for seed in range(25):
        g = torch.Generator().manual_seed(seed)
        n, c = int(torch.randint(20, 400, (1,), generator=g)), int(torch.randint(4, 200, (1,), generator=g))
        att, feats = torch.rand(n, generator=g), torch.randn(n, c, generator=g).to(dtype)
        k = max(1, round(0.111 * n))
        fast = cls_ops.vispruner_select(att, feats, k, 0.5)
        monkeypatch.setattr(cls_ops, "SIM_LIMIT", 0)
        slow = cls_ops.vispruner_select(att, feats, k, 0.5)
        monkeypatch.undo()
        assert torch.equal(fast, slow)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("neighbours", [1, 3, 64])
def test_vispruner_neighbour_lists_give_the_max_over_b_exactly(dtype, neighbours, monkeypatch) -> None:
    """The best match in B read from each token's sorted neighbour list (falling back to the direct max where the
    list holds no B token) keeps what the per-round GEMM keeps: short lists force the fallback, repeated tokens
    force ties."""
    from prunebench.methods import cls_ops

    monkeypatch.setattr(cls_ops, "NEIGHBOURS", neighbours)
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        n, c = int(torch.randint(40, 600, (1,), generator=g)), int(torch.randint(4, 64, (1,), generator=g))
        feats = torch.randn(n, c, generator=g)
        if seed % 3 == 0:  # many exact duplicates: equal cosines everywhere
            feats = feats[torch.randint(0, max(2, n // 8), (n,), generator=g)]
        unit = (feats / feats.norm(dim=-1, keepdim=True)).to(dtype)
        n_div = max(1, n // 9)
        fast = cls_ops._dedup_by_neighbours(unit @ unit.T, n_div)
        assert torch.equal(fast, cls_ops._dedup_by_gemm(unit, n_div)), seed
