"""ToMe tensor operations (Bolya et al., ICLR 2023; facebookresearch/ToMe `tome/merge.py`). No model code.

`tome_merge` is one step of `bipartite_soft_matching` + `merge_wavg`: tokens split by parity into
a (even) and b (odd) current positions, each a picks its most similar b by cosine of the metric
(the layer's head-mean keys), the r a's with the highest such similarity merge into their b's by
size-weighted mean. The layer schedule is `merge_ops.layer_schedule` (default `mean`: the
constant r per layer of ToMe, with the 50% per-layer cap).
"""

from __future__ import annotations

import torch

from prunebench.methods.merge_ops import MergeResult, merge_pairs

_EPS = 1e-12


SCORE_DTYPES = ("model", "fp32")


def score_cast(t: torch.Tensor, score_dtype: str) -> torch.Tensor:
    """The arithmetic dtype of a similarity score: `model` keeps the input's dtype (the official ToMe /
    VisPruner code computes in the model's dtype), `fp32` upcasts (our former behaviour)."""
    if score_dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype must be one of {', '.join(SCORE_DTYPES)}, got {score_dtype!r}")
    return t.float() if score_dtype == "fp32" else t


def bipartite_pairs(metric: torch.Tensor, r: int, protect: torch.Tensor | None = None,
                    score_dtype: str = "model") -> tuple[torch.Tensor, torch.Tensor]:
    """The r (a -> b) merges of bipartite soft matching (ToMe `tome/merge.py`).

    metric [B, T, C]; protect [B, T] bool (never merged: rows/columns of protected tokens are -inf,
    as ToMe does for [CLS]); score_dtype: see `score_cast`. Returns src [B, r] and dst [B, r]: old
    indices of the merged a-tokens and
    of the b-tokens they merge into. Ties in the ranking go to the earlier a (stable sort), ties among
    an a's b's to the earlier b. r must not exceed any row's unprotected a-tokens (`tome_merge` checks).
    """
    m = score_cast(metric, score_dtype)
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # [B, Ta, Tb] cosine
    # Protected tokens are masked in place, a's on their best score only: no [Ta, Tb] boolean matrix.
    if protect is not None and bool(protect[:, 1::2].any()):
        scores.masked_fill_(protect[:, None, 1::2], float("-inf"))
    node_max = scores.amax(dim=-1)  # each a's best score; max(dim) with indices is ~10x slower on CPU
    if protect is not None:
        node_max.masked_fill_(protect[:, 0::2], float("-inf"))
    src_a = node_max.sort(dim=-1, descending=True, stable=True).indices[:, :r]  # ToMe edge_idx[:r]
    # each chosen a's best b (the first maximum, as torch.max), found on its r rows only
    best_b = scores.gather(1, src_a[..., None].expand(-1, -1, scores.shape[-1])).argmax(dim=-1)
    return 2 * src_a, 2 * best_b + 1


def tome_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    rep: torch.Tensor,
    importance: torch.Tensor | None,
    r: int,
    *,
    metric: torch.Tensor,
    protect: torch.Tensor | None = None,
    score_dtype: str = "model",
) -> MergeResult:
    """Merge exactly r tokens per row: x [B, T, D] after self-attention, before the MLP.

    size [B, T] float (ToMe size), rep [B, T] long (original index each token stands for; tokens are
    sorted by rep), metric [B, T, C] (head-mean keys), protect [B, T] bool (e.g. [CLS]);
    score_dtype: the similarity's arithmetic dtype (`score_cast`).
    `importance` is not used (ToMe has none; the argument keeps the merge-callable contract).
    Survivors are returned sorted by rep (ToMe concatenates [unmerged a, b]; see the method card).
    """
    b, t, _ = x.shape
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"metric must be [B, T, C] with B, T = {tuple(x.shape[:2])}, got {tuple(metric.shape)}")
    user = protect.bool() if protect is not None else torch.zeros(b, t, dtype=torch.bool, device=x.device)
    free_a = int((~user[:, 0::2]).sum(-1).min()) if t else 0
    free_b = int((~user[:, 1::2]).sum(-1).min()) if t > 1 else 0
    if r < 0 or r > free_a or (r > 0 and free_b == 0):
        raise ValueError(f"r={r} is more than bipartite matching can merge here ({free_a} free a-tokens, "
                         f"{free_b} free b-tokens)")
    if r == 0:
        return MergeResult(x, size, rep, torch.arange(t, device=x.device).expand(b, t).clone(),
                           torch.zeros_like(user), user)
    src, dst = bipartite_pairs(metric, r, user, score_dtype)
    return merge_pairs(x, size, rep, src, dst, user)


def head_mean_keys(k: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[..., T, H * d] key projection output -> [..., T, d] mean over heads (ToMe's metric `k.mean(1)`)."""
    return k.unflatten(-1, (-1, head_dim)).mean(-2)


def proportional_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] sizes -> [B, 1, 1, T] additive attention bias log(size) (ToMe proportional attention,
    `tome/patch/timm.py` ToMeAttention: attn + size.log())."""
    return size.float().log()[:, None, None, :].to(dtype)
