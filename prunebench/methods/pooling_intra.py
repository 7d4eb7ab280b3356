"""Pooling at LLM layer K (papers/are-we-solving-the-right-problem.txt §4 footnote 1 and Appendix B,
Algorithm 4): the visual hidden states entering layer K are laid out on their grid, cut into windows,
and each window keeps its one token of largest L1 norm (a max-L1 "pool" that selects, not averages).
Kept tokens keep their original positions. Needs no attention.

Algorithm 4 uses a x a windows on an h x w grid, giving (h/a)(w/a) tokens; a budget is hit only
when k is such a square count. Our generalisation, exact for every k: an m x n window grid with
m = round(sqrt(k*h/w)) (clipped to 1..h), n = ceil(k/m) (if n > w: n = w, m = ceil(k/w)), rows and
columns cut into near-equal runs (`torch.tensor_split`); when m*n > k, the k windows whose pick has
the largest L1 norm keep it. On LLaVA-1.5's 24x24 grid: k=144 -> 12x12 windows of 2x2 and k=64 ->
8x8 windows of 3x3 (Algorithm 4 exactly); k=128 -> 11x12 windows, 132 picks, the best 128 kept.
"""

from __future__ import annotations

import math

import torch

from prunebench.methods.base import Positions, SelectContext, Stage, register_method
from prunebench.methods.grid_ops import require_grid, window_ids


def window_shape(k: int, h: int, w: int) -> tuple[int, int]:
    """(m, n) windows per column / row of an h x w grid, m*n >= k, close to the grid's aspect ratio."""
    if not 1 <= k <= h * w:
        raise ValueError(f"k must be in 1..{h * w}, got {k}")
    m = min(max(math.floor(math.sqrt(k * h / w) + 0.5), 1), h)
    n = math.ceil(k / m)
    if n > w:  # m rounded down below what a nearly full budget allows
        n, m = w, math.ceil(k / w)
    return m, n


def pooling_select(tokens: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """tokens [B, N, D] (raster order of the h x w grid) -> [B, k] kept indices, sorted.

    Per window the token of largest L1 norm (the first on ties, as torch.argmax); then the k
    windows whose picks have the largest L1 norm (the lower window on ties).
    """
    (h, w), (b, n_tokens, _) = grid, tokens.shape
    m, n = window_shape(k, h, w)
    wid = window_ids(h, w, m, n, tokens.device).expand(b, -1)  # [B, N]
    l1 = tokens.float().abs().sum(dim=-1)  # [B, N]
    best = torch.full((b, m * n), -math.inf, device=l1.device).scatter_reduce(1, wid, l1, "amax")
    index = torch.arange(n_tokens, device=l1.device).expand(b, -1)
    candidates = torch.where(l1 == best.gather(1, wid), index, n_tokens)
    picks = torch.full((b, m * n), n_tokens, device=l1.device).scatter_reduce(1, wid, candidates, "amin")
    top = best.argsort(dim=1, descending=True, stable=True)[:, :k]
    return picks.gather(1, top).sort(dim=-1).values


@register_method(
    "pooling_intra",
    stage=Stage.INTRA_LLM,
    source="papers/are-we-solving-the-right-problem.txt §4 fn. 1, App. B Algorithm 4 (Pooling at layer K=2)",
    needs=("grid",),
    dtype="per-window L1 norm of the hidden states in float32",
    rounding="round(keep*N) of the visual tokens entering layer K (n_keep_for, half up, >= 1); m x n >= k "
    "windows, the k best picks kept",
    positions=Positions.ORIGINAL,  # Algorithm 4 gathers X[[0:s) u I u [e:L]]; no renumbering is written
    defaults={"layer": 2},
    deviations=(
        "window grid generalised to every k: m = round(sqrt(k*h/w)), n = ceil(k/m) near-equal windows, the "
        "k picks of largest L1 norm kept when m*n > k (Algorithm 4: a x a windows, (h/a)(w/a) tokens)",
        "original positions: the paper does not say; Algorithm 4 only gathers rows",
        "needs one image of a fixed grid: refused on families with packed / dynamic visual tokens",
        "budget: k = round(keep*N) kept at layer K",
    ),
)
def pooling_intra(ctx: SelectContext, layer: int) -> torch.Tensor:
    """tokens [B, N, D] hidden states entering layer K, on grid ctx.grid -> [B, k] sorted indices."""
    del layer  # consumed by the intra-LLM stage
    return pooling_select(ctx.tokens, require_grid(ctx, "pooling_intra"), ctx.n_keep)
