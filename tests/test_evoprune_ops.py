"""EvoPrune tensor ops against brute-force references (papers/evoprune.txt §3.2-3.4, Appendix A)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from prunebench.methods.evoprune_ops import evoprune_merge, local_diversity
from prunebench.methods.merge_ops import layer_schedule, max_mergeable
from prunebench.stages.attention import received_attention

STRATEGIES = ["mean", "skip", "first", "last", "first[3]", "last[2]", "increasing", "decreasing",
              "increasing[2]", "decreasing[0.5]", "first[1]"]


def entering(r: list[int], n_tokens: int) -> list[int]:
    out, t = [], n_tokens
    for r_l in r:
        out.append(t)
        t -= r_l
    return out


def within_capacity(r: list[int], n_tokens: int) -> bool:
    return all(r_l <= t // 2 for r_l, t in zip(r, entering(r, n_tokens), strict=True))


def nominal_feasible(strategy: str, n_layers: int, n_tokens: int, n_remove: int) -> list[int] | None:
    """The schedule when no repair was needed, else None (used to test 'when feasible' properties)."""
    r = layer_schedule(strategy, n_layers, n_tokens, n_remove)
    # A repaired schedule is still within capacity; detect 'nominal' by recomputing it on a huge T.
    nominal = layer_schedule(strategy, n_layers, 10**9, n_remove)
    return r if r == nominal and within_capacity(nominal, n_tokens) else None


# ------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_schedule_sums_and_respects_capacity(strategy: str) -> None:
    for n_layers in (3, 4, 7, 12, 23):
        for n_tokens in (1, 9, 50, 196, 576):
            cap = max_mergeable(n_tokens, n_layers)
            budgets = {v for v in (0, 1, n_tokens // 3, n_tokens // 2, cap - 1, cap) if 0 <= v <= cap}
            for n_remove in sorted(budgets):
                if strategy == "first[3]" and n_layers < 3:
                    continue
                r = layer_schedule(strategy, n_layers, n_tokens, n_remove)
                assert len(r) == n_layers and min(r) >= 0
                assert sum(r) == n_remove, (strategy, n_layers, n_tokens, n_remove, r)
                assert within_capacity(r, n_tokens), (strategy, n_layers, n_tokens, n_remove, r)


@pytest.mark.parametrize("strategy", ["mean", "skip", "first", "last[1]", "increasing[3]", "decreasing"])
def test_schedule_exhaustive_small(strategy: str) -> None:
    """Every (n_layers, n_tokens, n_remove) on a small grid: feasible iff n_remove <= total capacity."""
    for n_layers in range(1, 7):
        for n_tokens in range(0, 31):
            cap = max_mergeable(n_tokens, n_layers)
            for n_remove in range(0, n_tokens + 1):
                if n_remove > cap:
                    with pytest.raises(ValueError, match="cannot merge"):
                        layer_schedule(strategy, n_layers, n_tokens, n_remove)
                    continue
                r = layer_schedule(strategy, n_layers, n_tokens, n_remove)
                assert sum(r) == n_remove and min(r) >= 0 and within_capacity(r, n_tokens)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n_remove", [448, 512, 544])
def test_schedule_realistic_llava(strategy: str, n_remove: int) -> None:
    """CLIP ViT-L/14-336 feeding layer -2: 23 layers, 576 patch tokens."""
    r = layer_schedule(strategy, 23, 576, n_remove)
    assert sum(r) == n_remove and within_capacity(r, 576)


def test_schedule_mean_exact_values() -> None:
    # 512 / 23 = 22 rem 6: the first 6 layers get one more (largest remainder, ties to the earlier layer).
    assert layer_schedule("mean", 23, 576, 512) == [23] * 6 + [22] * 17


def test_schedule_skip_even_layers_only() -> None:
    for n_remove in (448, 512, 544):
        r = layer_schedule("skip", 23, 576, n_remove)
        assert all(r_l == 0 for layer, r_l in enumerate(r) if layer % 2 == 1), r
        assert all(r_l > 0 for layer, r_l in enumerate(r) if layer % 2 == 0), r
    assert layer_schedule("skip", 6, 576, 30) == [10, 0, 10, 0, 10, 0]


def test_schedule_first_last_window() -> None:
    assert layer_schedule("first[2]", 5, 100, 20) == [10, 10, 0, 0, 0]
    assert layer_schedule("last[2]", 5, 100, 21) == [0, 0, 0, 11, 10]
    assert layer_schedule("first", 5, 100, 30) == [10, 10, 10, 0, 0]  # N = ceil(5/2)
    for strategy, on in (("first[8]", range(8)), ("last[8]", range(15, 23))):
        for n_remove in (448, 512):
            r = layer_schedule(strategy, 23, 576, n_remove)
            if nominal_feasible(strategy, 23, 576, n_remove) is not None:
                assert all(r_l == 0 for layer, r_l in enumerate(r) if layer not in on), r


def test_schedule_monotone_when_feasible() -> None:
    checked = 0
    for n_layers in (4, 12, 23):
        for n_remove in (10, 100, 300, 448, 512):
            for a in ("", "[0.5]", "[1]", "[2]"):
                inc = nominal_feasible(f"increasing{a}", n_layers, 576, n_remove)
                dec = nominal_feasible(f"decreasing{a}", n_layers, 576, n_remove)
                if inc is not None:
                    checked += 1
                    assert all(x <= y for x, y in pairwise(inc)), inc
                if dec is not None:
                    checked += 1
                    assert all(x >= y for x, y in pairwise(dec)), dec
    assert checked > 20
    assert layer_schedule("increasing", 4, 1000, 100) == [10, 20, 30, 40]
    assert layer_schedule("decreasing[2]", 3, 1000, 140) == [90, 40, 10]


def test_schedule_feasible_nominal_unchanged_and_repair() -> None:
    # Nominal first[1]: all 10 at layer 0 of 30 tokens (cap 15): unchanged.
    assert layer_schedule("first[1]", 3, 30, 10) == [10, 0, 0]
    # last[1] on 3 layers: nominal [0, 0, 12], but layer 2 sees 20 tokens (cap 10): moved earlier.
    r = layer_schedule("last[1]", 3, 20, 12)
    assert sum(r) == 12 and within_capacity(r, 20) and r != [0, 0, 12]
    assert r[2] > 0  # the scheduled layer keeps as much as fits
    # mean over 2 layers of 8 tokens removing 6: nominal [3, 3] violates layer 1 (5 tokens, cap 2).
    assert layer_schedule("mean", 2, 8, 6) == [4, 2]


def test_schedule_infeasible_raises() -> None:
    assert max_mergeable(576, 23) == 575
    with pytest.raises(ValueError, match=r"n_remove=576.*n_tokens=576.*n_layers=23"):
        layer_schedule("skip", 23, 576, 576)
    with pytest.raises(ValueError, match="n_tokens=100"):
        layer_schedule("mean", 1, 100, 51)
    layer_schedule("mean", 1, 100, 50)  # exactly at capacity: fine


@pytest.mark.parametrize("bad", ["", "median", "first[x]", "last[0]", "first[24]", "increasing[-1]",
                                 "mean[2]", "skip[3]", "decreasing[nan]", "first[2"])
def test_schedule_bad_strategy(bad: str) -> None:
    with pytest.raises(ValueError) as err:
        layer_schedule(bad, 23, 576, 100)
    msg = str(err.value)
    for form in ("mean", "skip", "first[N]", "last[N]", "increasing[a]", "decreasing[a]"):
        assert form in msg


# ------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("chunk", [1024, 7, 1])
def test_received_attention_matches_naive(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, h, t, d = 2, 3, 23, 8
    q, k = torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)
    scale = d**-0.5
    attn = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)  # [B, H, Tq, Tk]
    naive = attn.mean(dim=(1, 2)).float()  # column mean: attention each key token receives
    got = received_attention(q, k, scale, chunk=chunk)
    assert got.shape == (b, t) and got.dtype == torch.float32
    torch.testing.assert_close(got, naive, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(b), atol=1e-5, rtol=0)  # rows sum to 1


def test_received_attention_half_inputs_in_float32() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 9, 4, generator=g), torch.randn(1, 2, 9, 4, generator=g)
    got = received_attention(q.bfloat16(), k.bfloat16(), 0.5, chunk=4)
    want = received_attention(q.bfloat16().float(), k.bfloat16().float(), 0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def brute_diversity(x: torch.Tensor, knn: int, tau: float) -> torch.Tensor:
    out = torch.zeros(x.shape[:2], dtype=torch.float64)
    for bi in range(x.shape[0]):
        v = [row / math.sqrt(sum(c * c for c in row)) for row in
             [torch.tensor(r, dtype=torch.float64) for r in x[bi].tolist()]]
        for i in range(len(v)):
            dists = sorted(float(((v[i] - v[j]) ** 2).sum()) for j in range(len(v)) if j != i)
            near = dists[: min(knn, len(v) - 1)]
            out[bi, i] = 1 - sum(math.exp(-d2 / tau**2) for d2 in near) / len(near)
    return out


@pytest.mark.parametrize(("t", "knn", "tau"), [(12, 3, 1.0), (9, 5, 0.4), (4, 10, 2.0)])
def test_local_diversity_matches_brute_force(t: int, knn: int, tau: float) -> None:
    x = torch.randn(2, t, 6, generator=torch.Generator().manual_seed(t))
    got = local_diversity(x, knn, tau)
    torch.testing.assert_close(got.double(), brute_diversity(x, knn, tau), atol=1e-5, rtol=0)
    # Normalised features: scaling tokens changes nothing (our stated choice).
    torch.testing.assert_close(local_diversity(x * 7.5, knn, tau), got, atol=1e-5, rtol=0)


def test_local_diversity_duplicates_are_dense() -> None:
    x = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(3))
    x[0, 1] = x[0, 0] * 2  # same direction
    d = local_diversity(x, knn=1, tau=1.0)
    assert d[0, 0].abs() < 1e-5 and d[0, 1].abs() < 1e-5
    assert (d[0, 2:] > 1e-3).all()


# ------------------------------------------------------------------------------------ merge


def make_tokens(b: int, t: int, dim: int, seed: int, cls: bool = True):
    """Tokens as they look mid-encoder: optional CLS (rep -1) first, then patches sorted by rep."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, dim, generator=g)
    size = 1 + 3 * torch.rand(b, t, generator=g)
    n_patch = t - int(cls)
    reps = torch.stack([torch.randperm(4 * t, generator=g)[:n_patch].sort().values for _ in range(b)])
    if cls:
        reps = torch.cat([torch.full((b, 1), -1), reps], dim=1)
    importance = torch.rand(b, t, generator=g)
    protect = torch.zeros(b, t, dtype=torch.bool)
    if cls:
        protect[:, 0] = True
    return x, size, reps, importance, protect


def test_merge_contract() -> None:
    b, t, dim, r = 3, 21, 8, 6
    x, size, rep, imp, protect = make_tokens(b, t, dim, seed=0)
    out = evoprune_merge(x, size, rep, imp, r, protect=protect, knn=3, tau=0.8, lambda_d=0.7)
    assert out.x.shape == (b, t - r, dim) and out.size.shape == (b, t - r) and out.rep.shape == (b, t - r)
    assert (out.merged.sum(-1) == r).all()
    # Protected: CLS and the importance top min(floor(0.25*20), 20-12) = 5 are never merged.
    assert (out.protected[protect]).all()
    assert not (out.merged & out.protected).any()
    for bi in range(b):
        eligible = torch.nonzero(~protect[bi]).squeeze(-1)
        top = eligible[imp[bi, eligible].argsort(descending=True)[:5]]
        assert out.protected[bi, top].all()
        assert int(out.protected[bi].sum()) == 6
    # Merged tokens come from even positions, and go into odd, unmerged, unprotected ones.
    src = out.merged.nonzero()
    assert (src[:, 1] % 2 == 0).all()
    # Sorted by rep, CLS first.
    assert (out.rep[:, 1:] > out.rep[:, :-1]).all() and (out.rep[:, 0] == -1).all()
    # old_to_new groups: each new token is the size-weighted mean of the old tokens mapped to it.
    for bi in range(b):
        for p in range(t - r):
            group = (out.old_to_new[bi] == p).nonzero().squeeze(-1)
            assert group.numel() >= 1
            w = size[bi, group]
            torch.testing.assert_close(out.size[bi, p], w.sum())
            torch.testing.assert_close(out.x[bi, p], (w[:, None] * x[bi, group]).sum(0) / w.sum(),
                                       atol=1e-5, rtol=1e-5)
            unmerged = group[~out.merged[bi, group]]
            assert unmerged.numel() == 1 and out.rep[bi, p] == rep[bi, unmerged[0]]
            if group.numel() == 1:  # untouched token: exactly its old values
                assert torch.equal(out.x[bi, p], x[bi, group[0]]) and out.size[bi, p] == size[bi, group[0]]
            else:
                assert (unmerged[0] % 2 == 1) and not out.protected[bi, unmerged[0]]
    # Protected tokens: values unchanged.
    for bi, i in out.protected.nonzero().tolist():
        assert torch.equal(out.x[bi, out.old_to_new[bi, i]], x[bi, i])
    # Conservation of size and of the size-weighted token sum.
    torch.testing.assert_close(out.size.sum(-1), size.sum(-1))
    torch.testing.assert_close((out.size[..., None] * out.x).sum(1), (size[..., None] * x).sum(1),
                               atol=1e-5, rtol=1e-5)


def test_merge_r0_identity() -> None:
    x, size, rep, imp, protect = make_tokens(2, 11, 4, seed=1)
    out = evoprune_merge(x, size, rep, imp, 0, protect=protect)
    assert torch.equal(out.x, x) and torch.equal(out.size, size) and torch.equal(out.rep, rep)
    assert torch.equal(out.old_to_new, torch.arange(11).expand(2, 11))
    assert not out.merged.any()


def brute_merges(x, importance, protect, r, ctr, knn, tau, lambda_d) -> dict[int, int]:
    """§3.3-3.4 pair selection with Python loops for one row: merged a-token -> its b-token (old indices)."""
    t = x.shape[0]
    eligible = [i for i in range(t) if not protect[i]]
    n_protect = max(0, min(math.floor(ctr * len(eligible)), len(eligible) - 2 * r))
    ranked = sorted(eligible, key=lambda i: -float(importance[i]))
    protected = set(ranked[:n_protect]) | {i for i in range(t) if protect[i]}
    d = brute_diversity(x[None], knn, tau)[0]
    xs = x.double()
    best = []
    for i in range(0, t, 2):
        scores = {}
        for j in range(1, t, 2):
            if i in protected or j in protected:
                scores[j] = float("-inf")
                continue
            cos = float(xs[i] @ xs[j] / (xs[i].norm() * xs[j].norm()))
            scores[j] = cos * math.exp(-lambda_d * float(d[i] + d[j]))
        j_best = max(scores, key=lambda j: scores[j])
        best.append((scores[j_best], i, j_best))
    best.sort(key=lambda s: -s[0])
    return {i: j for _, i, j in best[:r]}


@pytest.mark.parametrize(("seed", "t", "r", "lam"), [(0, 15, 4, 1.5), (1, 15, 4, 1.5), (2, 31, 9, 4.0),
                                                     (3, 31, 12, 4.0), (4, 30, 7, 0.0)])
def test_merge_selection_matches_brute_force(seed: int, t: int, r: int, lam: float) -> None:
    ctr, knn, tau = 0.3, 3, 0.7
    x, size, rep, imp, protect = make_tokens(2, t, 5, seed=seed + 10)
    out = evoprune_merge(x, size, rep, imp, r, ctr=ctr, knn=knn, tau=tau, lambda_d=lam, protect=protect)
    for bi in range(2):
        want = brute_merges(x[bi], imp[bi], protect[bi], r, ctr, knn, tau, lam)
        got = {}
        for a in out.merged[bi].nonzero().squeeze(-1).tolist():
            partners = ((out.old_to_new[bi] == out.old_to_new[bi, a]) & ~out.merged[bi]).nonzero()
            got[a] = int(partners[0, 0])
        assert got == want


def test_merge_negative_similarity_still_blocked() -> None:
    """All cosines negative toward one protected b-token: w_attn must act as a mask, not a product."""
    x = torch.tensor([[[1.0, 0.0], [-1.0, 0.1], [0.9, 0.2], [0.8, -0.3]]])
    imp = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # token 1 (a b-token) is the most important
    out = evoprune_merge(x, torch.ones(1, 4), torch.arange(4)[None], imp, 1, ctr=0.25)
    assert out.protected[0, 1] and not out.merged[0, 1]
    assert out.old_to_new[0, out.merged[0].nonzero()[0, 0]] == out.old_to_new[0, 3]  # went into token 3


def test_merge_parity_imbalance_unprotects_least_important() -> None:
    # T=8, r=3: N_protect = min(2, 8-6) = 2, both even -> only 2 free a-tokens; un-protect the weaker one.
    x = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(5))
    imp = torch.tensor([[0.9, 0.1, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1]])
    out = evoprune_merge(x, torch.ones(1, 8), torch.arange(8)[None], imp, 3)
    assert out.protected[0].nonzero().squeeze(-1).tolist() == [0]
    assert int(out.merged.sum()) == 3 and set(out.merged[0].nonzero().squeeze(-1).tolist()) == {2, 4, 6}


def test_merge_infeasible_raises() -> None:
    x = torch.randn(1, 8, 4)
    protect = torch.tensor([[True, False] * 4])  # every a-token is user-protected
    with pytest.raises(ValueError, match="too few tokens"):
        evoprune_merge(x, torch.ones(1, 8), torch.arange(8)[None], torch.rand(1, 8), 1, protect=protect)
    with pytest.raises(ValueError, match="r must be"):
        evoprune_merge(x, torch.ones(1, 8), torch.arange(8)[None], torch.rand(1, 8), 5)


def test_merge_repeated_steps_keep_invariants() -> None:
    """A skip-style schedule over several steps, as the vision stage will run it."""
    x, size, rep, imp, protect = make_tokens(2, 577, 16, seed=7)
    size = torch.ones_like(size)
    total = (size[..., None] * x).sum(1)
    for r in layer_schedule("skip", 8, 576, 512):
        out = evoprune_merge(x, size, rep, torch.rand(x.shape[:2]), r, protect=rep < 0)
        x, size, rep = out.x, out.size, out.rep
        assert (rep[:, 1:] > rep[:, :-1]).all()
    assert x.shape[1] == 577 - 512 and (size.sum(-1) == 577).all()
    torch.testing.assert_close((size[..., None] * x).sum(1), total, atol=1e-3, rtol=1e-5)
