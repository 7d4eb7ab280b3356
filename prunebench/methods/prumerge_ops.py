"""LLaVA-PruMerge / PruMerge+ as pure tensor functions (Shang et al. 2024 §3; 42Shawn/LLaVA-PruMerge
`llava/model/multimodal_encoder/clip_encoder.py` `token_prune_merge_advanced(_plus)`).

Knows no model: it takes the patch features, the [CLS] attention row over the patches and the
patches' keys (last CLIP layer in the official code), picks the kept patches, merges into each
kept patch its most key-similar tokens weighted by their [CLS] attention, and builds the one
aggregate token of everything pruned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunebench.methods.base import top_k_sorted

N_NEIGHBOURS = 32  # official: topk(cos_sim, k=32) per kept token


def iqr_outlier_count(attn: torch.Tensor) -> torch.Tensor:
    """attn [B, N] -> [B] number of values above Q3 + 1.5 * IQR (official `outlier_dectection`,
    numpy's linear-interpolation percentiles, as torch.quantile's default)."""
    q = torch.quantile(attn.float(), torch.tensor([0.25, 0.75], device=attn.device), dim=1)  # [2, B]
    upper = q[1] + 1.5 * (q[1] - q[0])
    return (attn.float() > upper[:, None]).sum(dim=1)


def prumerge_select(attn: torch.Tensor, k: int) -> torch.Tensor:
    """PruMerge, fixed budget (official `if_adaptive=False`): the top-k patches by [CLS]
    attention. attn [B, N] -> [B, k] sorted."""
    return top_k_sorted(attn, k)


def adaptive_count(attn: torch.Tensor) -> int:
    """attn [1, N] -> the adaptive number of kept patches: the IQR outliers (official
    `token_prune_merge_advanced(if_adaptive=True)`: topk(int(N * ratio)), ratio = outliers / N),
    at least 1 (an image with no outlier would otherwise reach the LLM as the aggregate token only)."""
    return max(1, int(iqr_outlier_count(attn)[0]))


def prumerge_plus_adaptive_select(attn: torch.Tensor) -> torch.Tensor:
    """PruMerge+, adaptive (official `token_prune_merge_advanced_plus(if_adaptive=True)`): the c IQR
    outliers by [CLS] attention plus the grid arange(0, N - 1, (N // c) // 3) of patches not already
    kept (official arange(0, 575, int(int(1 / ratio) / 3)) with N = 576, ratio = c / N).
    attn [1, N] -> [1, m] sorted, m data-dependent."""
    n, c = attn.shape[1], adaptive_count(attn)
    top = attn[0].topk(c).indices
    grid = torch.arange(0, n - 1, max(1, (n // c) // 3), device=attn.device)
    grid = grid[~torch.isin(grid, top)]
    return torch.cat([top, grid]).sort().values[None]


def uniform_fill(taken: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """m slots spread uniformly over the n - |taken| free slots of one image, in raster order:
    the free slots at positions floor((j + 1/2) * F / m), j < m. taken [t] -> [m]."""
    free = torch.ones(n, dtype=torch.bool, device=taken.device)
    free[taken] = False
    slots = free.nonzero()[:, 0]
    pos = torch.div((2 * torch.arange(m, device=taken.device) + 1) * slots.numel(), 2 * m, rounding_mode="floor")
    return slots[pos]


def prumerge_plus_select(attn: torch.Tensor, k: int) -> torch.Tensor:
    """PruMerge+, fixed budget (EffiVLM-Bench's reading, METHODS.md): the top min(IQR outliers, k)
    patches by [CLS] attention, filled up to k with patches spread uniformly over the rest.
    attn [B, N] -> [B, k] sorted."""
    rows = []
    for row, n_out in zip(attn, iqr_outlier_count(attn).tolist(), strict=True):
        top = row.topk(min(int(n_out), k)).indices
        rows.append(torch.cat([top, uniform_fill(top, row.numel(), k - top.numel())]).sort().values)
    return torch.stack(rows)


def prumerge_merge(
    x: torch.Tensor, attn: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor, n_neighbours: int = N_NEIGHBOURS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge step of PruMerge(+).

    x: [B, N, D] patch features; attn: [B, N] [CLS] attention (unnormalised weights: the official
    code does not divide by their sum); keys: [B, N, Dk]; kept: [B, k] kept patch slots.
    Returns (merged [B, k, D], extra [B, D]): merged_i = x_i + sum_{j in nn(i)} attn_j x_j over the
    min(n_neighbours, N-1) tokens j != i (kept or pruned) with the highest key cosine to i, and
    extra = sum over the pruned tokens of attn_j x_j.
    """
    b, n, d = x.shape
    wide = torch.promote_types(x.dtype, torch.float32)  # half-precision features accumulate in fp32
    xf, af = x.to(wide), attn.to(wide)
    unit = F.normalize(keys.to(wide), dim=-1)
    sim = unit.gather(1, kept[..., None].expand(-1, -1, unit.shape[-1])) @ unit.transpose(1, 2)  # [B, k, N]
    sim.scatter_(2, kept[..., None], float("-inf"))  # a kept token is not its own neighbour
    nbr = sim.topk(min(n_neighbours, n - 1), dim=2).indices  # [B, k, m]
    weights = af.gather(1, nbr.flatten(1)).view_as(nbr)  # [B, k, m]
    gathered = xf.gather(1, nbr.flatten(1)[..., None].expand(-1, -1, d)).view(*nbr.shape, d)
    merged = xf.gather(1, kept[..., None].expand(-1, -1, d)) + (weights[..., None] * gathered).sum(dim=2)
    pruned = torch.ones(b, n, dtype=torch.bool, device=x.device).scatter_(1, kept, False)
    extra = ((af * pruned)[..., None] * xf).sum(dim=1)
    return merged.to(x.dtype), extra.to(x.dtype)


def extra_slot(kept: torch.Tensor, n: int) -> torch.Tensor:
    """Where the aggregate token sits: the slot of the last pruned patch (the official code appends
    it after the kept tokens; this is that place whenever the last patch is pruned).
    kept [B, k] with k < n -> [B]."""
    pruned = torch.ones(kept.shape[0], n, dtype=torch.bool, device=kept.device).scatter_(1, kept, False)
    return (pruned * torch.arange(1, n + 1, device=kept.device)).argmax(dim=1)
