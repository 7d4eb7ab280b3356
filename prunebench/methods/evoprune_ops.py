"""EvoPrune tensor operations (papers/evoprune.txt §3.2-3.4, Appendix A). No model code here.

- `layer_schedule` (how many tokens to merge at each encoder layer, Algorithm 1, Appendix A.1) and the
  size-weighted merge `merge_pairs` are shared with ToMe and MustDrop: `merge_ops.py`.
- importance s_i (the mean attention a token receives, §3.4) is the stage-side signal
  `prunebench.stages.attention.received_attention`.
- `local_diversity`: d_i, one minus the mean Gaussian kernel to the K nearest neighbours (§3.4).
- `evoprune_merge`: one score-guided bipartite merge step (§3.3-3.4), ToMe-style size-weighted.
"""

from __future__ import annotations

import torch

from prunebench.methods.merge_ops import MergeResult, merge_pairs

_EPS = 1e-12

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
