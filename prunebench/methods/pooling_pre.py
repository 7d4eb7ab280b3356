"""2-D average pooling before the LLM (METHODS.md "Pooling"; UniPruneBench `methods/Pool_PreLLM.py`
pools post-projector with `adaptive_avg_pool2d`; Wen et al. 2025, papers/are-we-solving-the-right-
problem.txt, report pooling as a strong baseline).

The post-projector visual tokens of an image, reshaped to their h x w grid, are average-pooled to
an m x n grid with m*n = k (a merge, not a drop). Each pooled token sits at the position of the
token at the centre of its window (with contiguous positions, the default, only the order
matters: raster order of the windows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prunebench.methods.base import Positions, SelectContext, Selection, Stage, register_method


def pool_shape(k: int, h: int, w: int) -> tuple[int, int]:
    """The m x n output grid for k tokens from an h x w grid: a factorisation m*n = k with m <= h,
    n <= w and m/n closest to h/w; when none fits, m = round(sqrt(k*h/w)), n = ceil(k/m) (the
    caller keeps the first k cells)."""
    pairs = [(m, k // m) for m in range(1, k + 1) if k % m == 0 and m <= h and k // m <= w]
    if pairs:
        return min(pairs, key=lambda p: (round(abs(math.log(p[0] / p[1]) - math.log(h / w)), 9), p[0]))
    m = min(h, max(1, round(math.sqrt(k * h / w))))
    return m, min(w, math.ceil(k / m))


def _centres(n_out: int, n_in: int) -> torch.Tensor:
    """Centre index of each adaptive-pooling window along one axis (PyTorch's window bounds)."""
    i = torch.arange(n_out)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    end = -torch.div(-(i + 1) * n_in, n_out, rounding_mode="floor")  # ceil
    return torch.div(start + end - 1, 2, rounding_mode="floor")


@register_method(
    "pooling_pre",
    stage=Stage.PRE_LLM,
    source="METHODS.md Pooling; UniPruneBench methods/Pool_PreLLM.py (adaptive_avg_pool2d after the projector)",
    needs=("grid",),
    dtype="average pooling in float32 (adaptive_avg_pool2d on upcast tokens), cast back to the model's dtype",
    rounding="round(keep*N) per image (n_keep_for, half up, >= 1); pooled to an m x n = k grid (first k windows "
    "when none fits)",
    positions=Positions.CONTIGUOUS,
    deviations=(
        "any budget k, not only squares: rectangular adaptive pooling to m x n = k (factorisation closest to the "
        "grid's aspect); a budget with no factorisation that fits the grid pools to m x ceil(k/m) and keeps the "
        "first k windows in raster order",
        "each pooled token takes the position of its window's centre token",
        "the record's merge groups (kept.merged_into: each patch -> the window of row floor(r*m/h), column "
        "floor(c*n/w)) are computed with the pooling, inside the method's timed span (a few index ops on N ints)",
    ),
)
def pooling_pre(ctx: SelectContext) -> Selection:
    """[B, N, D] on an (h, w) grid -> Selection(index [B, k], tokens [B, k, D]) of pooled tokens."""
    h, w = ctx.grid
    b, n, d = ctx.tokens.shape
    m, n_cols = pool_shape(ctx.n_keep, h, w)
    grid = ctx.tokens.transpose(1, 2).reshape(b, d, h, w)
    pooled = F.adaptive_avg_pool2d(grid.float(), (m, n_cols)).to(ctx.tokens.dtype)
    tokens = pooled.flatten(2).transpose(1, 2)[:, : ctx.n_keep]
    rows, cols = _centres(m, h), _centres(n_cols, w)
    index = (rows[:, None] * w + cols[None, :]).flatten()[: ctx.n_keep].to(ctx.tokens.device)
    return Selection(index=index.expand(b, -1), tokens=tokens, groups=_groups(index, m, n_cols, h, w).expand(b, -1))


def _groups(index: torch.Tensor, m: int, n_cols: int, h: int, w: int) -> torch.Tensor:
    """[h*w] the slot of the pooled token each patch went into: the window of row floor(r*m/h) and column
    floor(c*n/w), one of the adaptive windows holding the patch (they overlap by a row or column where m does
    not divide h); -1 for a patch whose windows were all cut (the first k windows kept)."""
    device = index.device
    r = torch.arange(h, device=device) * m // h
    c = torch.arange(w, device=device) * n_cols // w
    window = (r[:, None] * n_cols + c[None, :]).flatten()
    return torch.where(window < index.numel(), index[window.clamp(max=index.numel() - 1)], -1)
