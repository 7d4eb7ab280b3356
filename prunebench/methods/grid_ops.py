"""Window partitions of a visual-token grid, shared by the grid methods (Window FastV, Pooling).

Tokens are in raster order: token t sits at row t // w, column t % w of the h x w grid.
"""

from __future__ import annotations

import torch

from prunebench.methods.base import SelectContext


def require_grid(ctx: SelectContext, method: str) -> tuple[int, int]:
    """(h, w) of the visual tokens, or a clear error when they do not form one grid
    (several images, packed any-resolution features; the intra-LLM stage refuses such families at install)."""
    if ctx.grid is None:
        raise ValueError(
            f"{method} needs the visual tokens to form a grid (one image of the encoder's fixed grid); "
            f"these {ctx.tokens.shape[1]} visual tokens do not"
        )
    h, w = ctx.grid
    if h * w != ctx.tokens.shape[1]:
        raise ValueError(f"{method}: grid {h}x{w} does not hold the {ctx.tokens.shape[1]} visual tokens")
    return h, w


def _groups(size: int, parts: int) -> torch.Tensor:
    """[size] group of each index when 0..size-1 is cut into `parts` near-equal runs
    (`torch.tensor_split` sizes: the first size % parts runs are one longer)."""
    runs = torch.tensor_split(torch.arange(size), parts)
    return torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(runs)])


def window_ids(h: int, w: int, m: int, n: int, device: torch.device | None = None) -> torch.Tensor:
    """[h*w] window of each raster token when the rows are cut into m and the columns into n near-equal
    runs (1 <= m <= h, 1 <= n <= w, so no window is empty); windows are numbered row-major, 0..m*n-1."""
    if not (1 <= m <= h and 1 <= n <= w):
        raise ValueError(f"a {h}x{w} grid cannot be cut into {m}x{n} non-empty windows")
    return (_groups(h, m)[:, None] * n + _groups(w, n)[None, :]).flatten().to(device)


def rank_within(groups: torch.Tensor, order: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Rank of each token inside its group when tokens are visited in `order`.

    groups: [N] group of each token; order: [B, N] a permutation per row (e.g. by descending score).
    Returns [B, N] (indexed by token): 0 for the first token of its group visited, 1 for the next, ...
    """
    visited = groups[order]  # [B, N] group of the i-th visited token
    onehot = torch.nn.functional.one_hot(visited, n_groups)  # [B, N, G]
    rank_visited = (onehot.cumsum(dim=1) * onehot).sum(dim=-1) - 1  # [B, N]
    return torch.empty_like(rank_visited).scatter_(1, order, rank_visited)
