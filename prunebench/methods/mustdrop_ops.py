"""MustDrop's vision-encoder stages as pure tensor functions (Liu et al. 2024 §3.2; liuting20/MustDrop
`llava/model/multimodal_encoder/local_merge.py` `conditional_pooling` + `merge_wavg`, and
`clip_encoder.py` `CLIPVisionModelAcc.custom_forward`). No model code here; the hooks are in
`stages/vision_mustdrop.py`.

- `window_members`: the non-overlapping ws x ws windows of an h x w patch grid (raster order).
- `window_scores`: per window, the mean off-diagonal cosine similarity of its tokens.
- `window_merge`: every window scoring >= threshold (the same count r for the whole batch: the
  official `.min()` over the batch, the top-r windows per image) becomes ONE token, the size-weighted
  mean of its members, standing for its last (bottom-right) member, the official `dst`. The output order
  is the official `merge`'s, `cat([x_cls, dst, unm])`: prefix, the merged windows by descending score,
  then the unmerged patches in raster order (`order="merged_first"`); or every survivor in raster order
  of its patch (`order="raster"`).
- `key_set`: the top ceil(ratio * M) of M patch tokens by [CLS] attention (official ratio 0.08).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from prunebench.methods.merge_ops import MergeResult, merge_pairs


def window_members(grid: tuple[int, int], window: int) -> torch.Tensor:
    """[G, window*window] raster patch indices of each window (windows in raster order, members
    row-major inside the window; the last member is the window's bottom-right patch)."""
    h, w = grid
    if h % window or w % window:
        raise ValueError(f"a {h}x{w} grid does not split into {window}x{window} windows")
    index = torch.arange(h * w).view(h // window, window, w // window, window)
    return index.permute(0, 2, 1, 3).reshape(-1, window * window)


def window_scores(x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] patch tokens, members [G, m] -> [B, G] float32: mean over the m(m-1) ordered pairs
    i != j of a window of cos(x_i, x_j) (the official `similarity_map`)."""
    win = x.float()[:, members]  # [B, G, m, D]
    sims = F.cosine_similarity(win[:, :, :, None], win[:, :, None], dim=-1)  # [B, G, m, m]
    m = members.shape[1]
    off = 1.0 - torch.eye(m, device=x.device)
    return (sims * off).sum(dim=(-1, -2)) / (m * (m - 1))


def merged_windows(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """scores [B, G] -> [B, r] the windows that merge: r = min over the batch of the count scoring
    >= threshold, each image's top-r by score (ties to the earlier window)."""
    r = int((scores >= threshold).sum(dim=-1).min())
    return scores.sort(dim=-1, descending=True, stable=True).indices[:, :r]


TOKEN_ORDERS = ("merged_first", "raster")


def window_merge(x: torch.Tensor, size: torch.Tensor, rep: torch.Tensor, grid: tuple[int, int], window: int,
                 threshold: float, prefix: int = 1, order: str = "merged_first") -> MergeResult:
    """One MustDrop window merge on an encoder sequence x [B, prefix + N, D] (N = h*w patches in raster
    order, not merged before), size / rep [B, prefix + N] (MergeState bookkeeping, prefix tokens such as
    [CLS] never merge). Each window scoring >= threshold merges into its bottom-right member (size-weighted
    mean, float32). Survivors: order "merged_first" = [prefix, merged windows by descending score (ties to
    the earlier window), unmerged by rep] (official `merge`), "raster" = sorted by rep.
    Returns MergeResult with T - 8r tokens (3x3 windows)."""
    if x.shape[1] != prefix + grid[0] * grid[1]:
        raise ValueError(f"window merge expects {prefix} + {grid[0]}x{grid[1]} tokens, got {x.shape[1]}")
    if order not in TOKEN_ORDERS:
        raise ValueError(f"window merge order must be one of {TOKEN_ORDERS}, got {order!r}")
    members = window_members(grid, window).to(x.device)
    chosen = merged_windows(window_scores(x[:, prefix:], members), threshold)  # [B, r]
    groups = members[chosen] + prefix  # [B, r, m] sequence indices
    src, dst = groups[:, :, :-1], groups[:, :, -1:].expand(-1, -1, members.shape[1] - 1)
    b = x.shape[0]
    protected = torch.zeros(b, x.shape[1], dtype=torch.bool, device=x.device)
    protected[:, :prefix] = True
    out = merge_pairs(x, size, rep, src.reshape(b, -1), dst.reshape(b, -1), protected)
    if order == "raster" or chosen.shape[1] == 0:
        return out
    return merged_first(out, rep.gather(1, groups[:, :, -1]))


def merged_first(out: MergeResult, dst_rep: torch.Tensor) -> MergeResult:
    """Reorder a rep-sorted MergeResult to the official [prefix (rep < 0), the tokens whose rep is
    dst_rep [B, r] in that order, the rest by rep]."""
    t = out.rep.shape[1]
    pos = torch.arange(t, device=out.rep.device).expand_as(out.rep)
    # rank of each survivor among the merged windows (dst_rep order), or -1
    hit = out.rep[:, :, None] == dst_rep[:, None, :]  # [B, T', r]
    rank = torch.where(hit.any(-1), hit.float().argmax(-1), -1)
    key = torch.where(out.rep < 0, pos - 2 * t, torch.where(rank >= 0, rank - t, pos))
    perm = key.argsort(dim=-1)  # keys are distinct
    inverse = perm.argsort(dim=-1)

    def take(v: torch.Tensor) -> torch.Tensor:
        return v.gather(1, perm if v.dim() == 2 else perm[..., None].expand(-1, -1, v.shape[-1]))

    return dataclasses.replace(out, x=take(out.x), size=take(out.size), rep=take(out.rep),
                               old_to_new=inverse.gather(1, out.old_to_new))


def key_set_size(n_patches: int, ratio: float) -> int:
    """ceil(ratio * M) for M patch tokens (official `math.ceil(0.08 * (N - 1))`, N counting [CLS])."""
    return min(n_patches, math.ceil(ratio * n_patches))


def key_set(cls_attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """cls_attention [B, M] (head-mean [CLS] row over the patch tokens) -> [B, M] bool: the top
    ceil(ratio * M) tokens (ties to the earlier token)."""
    k = key_set_size(cls_attention.shape[1], ratio)
    top = cls_attention.float().sort(dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(cls_attention, dtype=torch.bool).scatter(1, top, True)
