"""EvoPrune tensor operations (papers/evoprune.txt §3.2-3.4, Appendix A). No model code here.

- `layer_schedule`: how many tokens to merge at each encoder layer (Algorithm 1, Appendix A.1).
- importance s_i (the mean attention a token receives, §3.4) is the stage-side signal
  `prunebench.stages.attention.received_attention`.
- `local_diversity`: d_i, one minus the mean Gaussian kernel to the K nearest neighbours (§3.4).
- `evoprune_merge`: one score-guided bipartite merge step (§3.3-3.4), ToMe-style size-weighted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import torch

_EPS = 1e-12

# ----------------------------------------------------------------------------------------------
# Layer schedule (evoprune.txt §3.2, Algorithm 1, Appendix A.1)
# ----------------------------------------------------------------------------------------------

VALID_STRATEGIES = (
    "mean, skip, first[N], last[N], increasing[a], decreasing[a] "
    "(N: integer 1..n_layers, default ceil(n_layers/2); a: number >= 0, default 1.0)"
)
_STRATEGY_RE = re.compile(r"^\s*(mean|skip|first|last|increasing|decreasing)\s*(?:\[\s*([^\]]*?)\s*\])?\s*$")

# Where a vision merge acts in an encoder layer: between attention and MLP (ToMe), or between layers
MERGE_POINTS = ("attention", "layer")


def _bad_strategy(strategy: str, why: str) -> ValueError:
    return ValueError(f"bad EvoPrune layer strategy {strategy!r} ({why}); valid forms: {VALID_STRATEGIES}")


def _strategy_weights(strategy: str, n_layers: int) -> list[float]:
    """Relative merge budget of each layer, Appendix A.1 (first/last/increasing/decreasing as written
    there; `skip` = every other layer starting at layer 0)."""
    m = _STRATEGY_RE.match(strategy.lower())
    if m is None:
        raise _bad_strategy(strategy, "unrecognised")
    name, arg = m.group(1), m.group(2)
    if name in ("mean", "skip"):
        if arg is not None:
            raise _bad_strategy(strategy, f"'{name}' takes no parameter")
        return [1.0 if name == "mean" or layer % 2 == 0 else 0.0 for layer in range(n_layers)]
    if name in ("first", "last"):
        try:
            n = math.ceil(n_layers / 2) if arg in (None, "") else int(arg)
        except ValueError:
            raise _bad_strategy(strategy, "N must be an integer") from None
        if not 1 <= n <= n_layers:
            raise _bad_strategy(strategy, f"N={n} outside 1..n_layers={n_layers}")
        on = range(n) if name == "first" else range(n_layers - n, n_layers)
        return [1.0 if layer in on else 0.0 for layer in range(n_layers)]
    try:
        a = 1.0 if arg in (None, "") else float(arg)
    except ValueError:
        raise _bad_strategy(strategy, "a must be a number") from None
    if not (math.isfinite(a) and a >= 0):
        raise _bad_strategy(strategy, f"a={a} must be finite and >= 0")
    if name == "increasing":
        return [float(layer + 1) ** a for layer in range(n_layers)]
    return [float(n_layers - layer) ** a for layer in range(n_layers)]


def _apportion(weights: list[float], total: int) -> list[int]:
    """Largest-remainder rounding of total*w/sum(w), exact (Fractions); ties go to the earlier layer."""
    wsum = sum(Fraction(w) for w in weights)
    quotas = [Fraction(total) * Fraction(w) / wsum for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda layer: (-(quotas[layer] - counts[layer]), layer))
    for layer in order[: total - sum(counts)]:
        counts[layer] += 1
    return counts


def _tokens_entering(r: list[int], n_tokens: int) -> list[int]:
    """T_l: tokens entering layer l (T_0 = n_tokens, T_{l+1} = T_l - r_l)."""
    t, out = n_tokens, []
    for r_l in r:
        out.append(t)
        t -= r_l
    return out


def max_mergeable(n_tokens: int, n_layers: int) -> int:
    """Most tokens n_layers bipartite steps can merge: each step at most floor(T/2) (§3.3)."""
    t = n_tokens
    for _ in range(n_layers):
        t -= t // 2
    return n_tokens - t


def _nearest_with_slack(candidates: list[int], slack: list[int], scheduled: list[bool]) -> int | None:
    """First candidate (ordered nearest-first) with slack, preferring scheduled layers."""
    for want_scheduled in (True, False):
        for layer in candidates:
            if slack[layer] > 0 and (scheduled[layer] or not want_scheduled):
                return layer
    return None


def _repair_capacity(r: list[int], n_tokens: int) -> list[int] | None:
    """Move budget off layers with r_l > floor(T_l/2) until every layer is within capacity.

    The excess goes to the nearest EARLIER layer with slack (scheduled layers first, then any). Only if
    no earlier layer has slack does it go to the nearest later one (our extension: the literal rule
    would give up although the total capacity suffices, e.g. first[1] with R > T/2). None = stuck.
    """
    r = list(r)
    scheduled = [r_l > 0 for r_l in r]
    for _ in range(4 * len(r) * (sum(r) + 1)):  # each move shifts >= 1 token; generous guard
        t = _tokens_entering(r, n_tokens)
        bad = next((layer for layer, (r_l, t_l) in enumerate(zip(r, t, strict=True)) if r_l > t_l // 2), None)
        if bad is None:
            return r
        # Earlier donee m: T_bad drops by the moved amount too, so moving e fixes `bad` iff
        # 2(r - e) <= T - e, i.e. e >= 2r - T; m itself can take floor(T_m/2) - r_m more.
        slack = [t_l // 2 - r_l for t_l, r_l in zip(t, r, strict=True)]
        m = _nearest_with_slack(list(range(bad - 1, -1, -1)), slack, scheduled)
        need = 2 * r[bad] - t[bad]
        if m is None:
            # Later donee k: T_k grows by the moved amount, so k can take T_k - 2 r_k more.
            slack = [t_l - 2 * r_l for t_l, r_l in zip(t, r, strict=True)]
            m = _nearest_with_slack(list(range(bad + 1, len(r))), slack, scheduled)
            need = r[bad] - t[bad] // 2
            if m is None:
                return None
        move = min(need, slack[m])
        r[bad] -= move
        r[m] += move
    return None


def layer_schedule(strategy: str, n_layers: int, n_tokens: int, n_remove: int) -> list[int]:
    """Tokens merged at each of `n_layers` encoder layers; sums to exactly `n_remove`.

    Layers 0..n_layers-1 are the layers that feed the selected features. Strategy strings
    (Appendix A.1): mean, skip, first[N], last[N], increasing[a] (weight ∝ (l+1)^a),
    decreasing[a] (weight ∝ (n_layers-l)^a). Integer counts by largest remainder, ties to the
    earlier layer. A nominal schedule within every layer's capacity r_l <= floor(T_l/2) is returned
    unchanged; otherwise the excess is moved as in `_repair_capacity`.

    Raises ValueError for a bad strategy string or when n_layers bipartite steps cannot merge
    n_remove of n_tokens tokens.
    """
    if n_layers < 1 or n_tokens < 0 or n_remove < 0:
        raise ValueError(
            f"need n_layers >= 1, n_tokens >= 0, n_remove >= 0; got {n_layers}, {n_tokens}, {n_remove}"
        )
    weights = _strategy_weights(strategy, n_layers)
    capacity = max_mergeable(n_tokens, n_layers)
    if n_remove > capacity:
        raise ValueError(
            f"cannot merge n_remove={n_remove} of n_tokens={n_tokens} tokens over n_layers={n_layers} "
            f"layers: one bipartite step merges at most floor(T/2), so at most {capacity} in total"
        )
    if n_remove == 0:
        return [0] * n_layers
    repaired = _repair_capacity(_apportion(weights, n_remove), n_tokens)
    if repaired is None:  # not expected once the total capacity suffices; kept as a hard stop
        raise ValueError(
            f"no feasible {strategy!r} schedule for n_remove={n_remove}, n_tokens={n_tokens}, "
            f"n_layers={n_layers}"
        )
    return repaired


def local_diversity(x: torch.Tensor, knn: int, tau: float) -> torch.Tensor:
    """Local diversity d_i (§3.4): [B, T, D] -> [B, T] float32 in [0, 1].

    d_i = 1 - (1/K) sum_{k in kNN(i)} exp(-||v_i - v_k||^2 / tau^2), kNN by squared Euclidean
    distance, i itself excluded, K = min(knn, T-1). Our choice: v = x / ||x|| (L2-normalised), so
    ||v_i - v_k||^2 = 2 - 2 cos lies in [0, 4] and tau is scale-free. A lone token (T = 1) gets d = 1.
    """
    if knn < 1 or tau <= 0:
        raise ValueError(f"need knn >= 1 and tau > 0; got knn={knn}, tau={tau}")
    t = x.shape[1]
    kk = min(knn, t - 1)
    if kk == 0:
        return torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
    v = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(_EPS)
    sq = (v * v).sum(-1)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2 * v @ v.transpose(1, 2)).clamp_min(0)
    d2 = d2.masked_fill(torch.eye(t, dtype=torch.bool, device=x.device), float("inf"))
    nearest = d2.topk(kk, dim=-1, largest=False).values  # [B, T, K]
    return 1 - torch.exp(-nearest / tau**2).mean(-1)


# ----------------------------------------------------------------------------------------------
# Score-guided merge step (evoprune.txt §3.3-3.4)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeResult:
    """One merge step: T tokens in, T - r out.

    x [B, T-r, D], size [B, T-r], rep [B, T-r]: surviving tokens, sorted by rep.
    old_to_new [B, T] long: new index of each old token (merged tokens: the token they merged into).
    merged [B, T] bool: old tokens merged away. protected [B, T] bool: protected set actually used.
    """

    x: torch.Tensor
    size: torch.Tensor
    rep: torch.Tensor
    old_to_new: torch.Tensor
    merged: torch.Tensor
    protected: torch.Tensor


def _importance_rank(importance: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
    """[B, T] rank of each token by importance among non-`protect` tokens (0 = most important;
    ties to the earlier index); `protect` tokens rank last."""
    imp = importance.float().masked_fill(user, float("-inf"))
    order = imp.sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(imp.shape[1], device=imp.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


def _protected_set(importance: torch.Tensor, user: torch.Tensor, r: int, ctr: float) -> torch.Tensor:
    """`protect` plus the top N_protect by importance, N_protect = min(floor(CTR*T), T - 2r) (§3.4),
    T counting only tokens not in `protect`, clipped at 0."""
    n_el = (~user).sum(-1)
    n_ctr = torch.floor(n_el.double() * ctr + 1e-9).long()  # +1e-9: 0.29*100 must floor to 29
    n_protect = torch.minimum(n_ctr, n_el - 2 * r).clamp_min(0)
    top = (_importance_rank(importance, user) < n_protect[:, None]) & ~user
    return user | top


def _make_feasible(
    protected: torch.Tensor, user: torch.Tensor, importance: torch.Tensor, r: int
) -> torch.Tensor:
    """Deviation (not in the paper): when parity leaves < r free a-tokens (or no free b-token), drop the
    least important importance-protected tokens of the short side until r merges are possible."""
    free_a, free_b = (~protected[:, 0::2]).sum(-1), (~protected[:, 1::2]).sum(-1)
    if bool(((free_a >= r) & (free_b >= 1)).all()):
        return protected
    protected = protected.clone()
    rank = _importance_rank(importance, user)
    for row in range(protected.shape[0]):
        for parity, need in ((0, r), (1, 1)):
            while int((~protected[row, parity::2]).sum()) < need:
                idx = torch.arange(parity, protected.shape[1], 2, device=protected.device)
                cand = idx[protected[row, idx] & ~user[row, idx]]
                if cand.numel() == 0:
                    raise ValueError(
                        f"cannot merge r={r} tokens in batch row {row}: too few tokens outside `protect` "
                        f"at {'even' if parity == 0 else 'odd'} positions"
                    )
                protected[row, cand[rank[row, cand].argmax()]] = False
    return protected


def _pair_scores(
    x: torch.Tensor, protected: torch.Tensor, knn: int, tau: float, lambda_d: float
) -> torch.Tensor:
    """Score_ij = Sim_ij * w_div_ij for a = even, b = odd positions, -inf where i or j is protected.

    [B, T, D] -> [B, ceil(T/2), floor(T/2)] float32. w_attn is applied as a mask: the literal product
    Sim * (-inf) would be +inf for negative Sim (§3.4).
    """
    xf = x.float()
    xn = xf / xf.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    sim = xn[:, 0::2] @ xn[:, 1::2].transpose(1, 2)  # cosine, §3.4 "Similarity Attraction"
    d = local_diversity(x, knn, tau)
    w_div = torch.exp(-lambda_d * (d[:, 0::2, None] + d[:, None, 1::2]))  # §3.4 "Diversity Penalty"
    blocked = protected[:, 0::2, None] | protected[:, None, 1::2]  # §3.4 "Attention Preservation"
    return (sim * w_div).masked_fill(blocked, float("-inf"))


def _check_merge_inputs(x: torch.Tensor, size: torch.Tensor, rep: torch.Tensor, importance: torch.Tensor,
                        r: int, ctr: float, protect: torch.Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got {tuple(x.shape)}")
    for name, t in (("size", size), ("rep", rep), ("importance", importance), ("protect", protect)):
        if t is not None and tuple(t.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name} must be [B, T] = {tuple(x.shape[:2])}, got {tuple(t.shape)}")
    if not 0.0 <= ctr <= 1.0:
        raise ValueError(f"ctr must be in [0, 1], got {ctr}")
    if r < 0 or 2 * r > x.shape[1]:
        raise ValueError(f"r must be in 0..floor(T/2) = 0..{x.shape[1] // 2}, got {r}")


def evoprune_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    rep: torch.Tensor,
    importance: torch.Tensor,
    r: int,
    *,
    ctr: float = 0.25,
    knn: int = 5,
    tau: float = 1.0,
    lambda_d: float = 1.0,
    protect: torch.Tensor | None = None,
) -> MergeResult:
    """Merge exactly r tokens per row (§3.3): x [B, T, D] after self-attention, before the MLP.

    size [B, T] float: original tokens each token stands for (ToMe size). rep [B, T] long: the original
    index it stands for (-1 for [CLS]); tokens are sorted by rep. importance [B, T]: received attention.
    protect [B, T] bool (optional): never merged (e.g. CLS).

    a = even, b = odd CURRENT positions; Score = cos(a_i, b_j) * exp(-lambda_d (d_i + d_j)) with d from
    `local_diversity` over all T tokens, -inf (as a mask) for pairs touching a protected token; the
    protected set is `protect` plus the top min(floor(ctr*T'), T'-2r) by importance (T' = tokens not in
    `protect`). Each a picks its best b; the r best a's merge into their b's by size-weighted mean
    (ToMe merge_wavg; several a's may share a b). Deviation: see `_make_feasible`.
    """
    _check_merge_inputs(x, size, rep, importance, r, ctr, protect)
    b, t, _ = x.shape
    user = protect.bool() if protect is not None else torch.zeros(b, t, dtype=torch.bool, device=x.device)
    protected = _protected_set(importance, user, r, ctr)
    if r == 0:
        arange = torch.arange(t, device=x.device).expand(b, t).clone()
        return MergeResult(x, size, rep, arange, torch.zeros_like(user), protected)
    protected = _make_feasible(protected, user, importance, r)

    score = _pair_scores(x, protected, knn, tau, lambda_d)
    best_j = score.argmax(-1)  # [B, Ta]
    best = score.gather(-1, best_j[..., None]).squeeze(-1)
    chosen = best.sort(dim=-1, descending=True, stable=True).indices[:, :r]  # top-r a's, §3.3
    src = 2 * chosen  # old index of each merged a-token
    dst = 2 * best_j.gather(-1, chosen) + 1  # old index of its b-token
    return merge_pairs(x, size, rep, src, dst, protected)


def merge_pairs(x: torch.Tensor, size: torch.Tensor, rep: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                protected: torch.Tensor) -> MergeResult:
    """Merge tokens src [B, r] into dst [B, r] (old indices; several src may share a dst) by size-weighted
    mean (ToMe `merge_wavg`), in float32; untouched tokens keep their exact values. Survivors are sorted
    by rep; x [B, T, D], size [B, T], rep [B, T]; protected [B, T] is only reported."""
    b, t, dim = x.shape
    n = t - src.shape[1]
    merged = torch.zeros(b, t, dtype=torch.bool, device=x.device).scatter_(1, src, True)
    keep = rep.masked_fill(merged, torch.iinfo(rep.dtype).max).sort(dim=-1, stable=True).indices[:, :n]
    new_index = torch.arange(n, device=x.device).expand(b, n)
    old_to_new = torch.full((b, t), -1, device=x.device).scatter_(1, keep, new_index)
    dst_new = old_to_new.gather(1, dst)
    old_to_new.scatter_(1, src, dst_new)  # merged src tokens point at their dst's new index

    sf = size.float()
    src_size, kept_size = sf.gather(1, src), sf.gather(1, keep)
    size_out = kept_size.scatter_add(1, dst_new, src_size)  # ToMe: size = merge(size)

    # Only the r sources and their destinations are touched (ToMe's merge_wavg weights and divides the whole
    # tensor): kept rows are copied once, in x's dtype; each distinct destination becomes (x*size + its
    # sources' x*size, added in src order) / its new size, in float32. Flat row indices: index_select is the
    # fast CPU copy (gather with an expanded index is ~6x slower). float64 is rounded to float32 first.
    row = torch.arange(b, device=x.device)[:, None]
    fits = torch.promote_types(x.dtype, torch.float32) == torch.float32  # float32 holds x exactly
    flat = (x if fits else x.float()).reshape(b * t, dim)
    out = flat.index_select(0, (keep + row * t).view(-1))  # [B*(T-r), D]
    at, slot = torch.unique(dst_new + row * n, return_inverse=True)  # distinct destinations in out
    acc = out.index_select(0, at).float() * kept_size.view(-1).index_select(0, at)[:, None]
    sources = flat.index_select(0, (src + row * t).view(-1)).float() * src_size.view(-1, 1)
    acc.index_put_((slot.view(-1),), sources, accumulate=True)
    out.index_copy_(0, at, (acc / size_out.view(-1).index_select(0, at)[:, None]).to(out.dtype))
    return MergeResult(
        x=out.view(b, n, dim).to(x.dtype),
        size=size_out.to(size.dtype),
        rep=rep.gather(1, keep),
        old_to_new=old_to_new,
        merged=merged,
        protected=protected,
    )
