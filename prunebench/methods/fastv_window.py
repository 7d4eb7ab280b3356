"""Window FastV (papers/are-we-solving-the-right-problem.txt §4.2 and Appendix B, Algorithm 3).

FastV's scores (the last prompt token's head-mean attention at layer K-1) are laid out on the
visual-token grid, the grid is cut into windows x windows non-overlapping windows, and each window
keeps its own top tokens, so the kept set is spread evenly over the image instead of piling up at
its end (FastV's position bias, §4.1). Kept tokens keep their original positions (FastV).

Quotas (Algorithm 3 line 11 is garbled; this is our exact reading): every window gets
floor(k / n_windows); the k mod n_windows extra slots go to the windows with the highest mean score
(line 10's A_ij); a window with fewer tokens than its quota passes its unused slots on to the
best-scoring tokens not yet kept, anywhere in the grid, so exactly k are kept.
"""

from __future__ import annotations

import torch

from prunebench.methods.base import Positions, SelectContext, Stage, register_method
from prunebench.methods.grid_ops import rank_within, require_grid, window_ids


def window_fastv_select(scores: torch.Tensor, grid: tuple[int, int], k: int, windows: int) -> torch.Tensor:
    """scores [B, N] (raster order of the h x w grid) -> [B, k] kept indices, sorted.

    The grid is cut into min(windows, h) x min(windows, w) near-equal windows (`torch.tensor_split`
    sizes when they do not divide it). Ties go to the lower index.
    """
    if windows < 1:
        raise ValueError(f"fastv_window: windows must be >= 1, got {windows}")
    (h, w), b = grid, scores.shape[0]
    wid = window_ids(h, w, min(windows, h), min(windows, w), scores.device)  # [N]
    n_win = int(wid.max()) + 1
    sizes = torch.bincount(wid, minlength=n_win)  # [W]
    s = scores.float()
    mean = torch.zeros(b, n_win, device=s.device).index_add_(1, wid, s) / sizes
    by_mean = mean.argsort(dim=1, descending=True, stable=True)
    extra = torch.zeros(b, n_win, dtype=torch.long, device=s.device)
    extra.scatter_(1, by_mean[:, : k % n_win], 1)
    quota = (k // n_win + extra).minimum(sizes)  # [B, W]
    rank = rank_within(wid, s.argsort(dim=1, descending=True, stable=True), n_win)  # [B, N]
    chosen = rank < quota.gather(1, wid.expand(b, -1))
    # unused quota (windows smaller than theirs) goes to the best remaining tokens anywhere
    key = torch.where(chosen, torch.full_like(s, float("inf")), s)
    return key.argsort(dim=1, descending=True, stable=True)[:, :k].sort(dim=-1).values


@register_method(
    "fastv_window",
    stage=Stage.INTRA_LLM,
    source="papers/are-we-solving-the-right-problem.txt §4.2, App. B Algorithm 3 (Window FastV); no code released",
    needs=("last_query_attention", "grid"),
    dtype="last-token row from layer K-1's q/k projections + RoPE in the model's dtype; q.k logits, softmax and "
    "head mean in float32 (stages/attention.py upcasts q and k); window means in float32",
    rounding="round(keep*N) of the visual tokens entering layer K (n_keep_for, half up, >= 1); quota floor(k/W) "
    "per window, remainder to the windows of highest mean score",
    positions=Positions.ORIGINAL,  # as FastV
    defaults={"layer": 2, "windows": 4},
    deviations=(
        "windows per side = 4 (4x4 windows of 6x6 on LLaVA-1.5's 24x24) is METHODS.md's suggestion: "
        "the paper gives no window size",
        "quota per window = floor(k / n_windows), the remainder to the windows of highest mean score, "
        "slots a window cannot fill to the best remaining tokens (Algorithm 3 line 11 is garbled)",
        "grids the windows do not divide: near-equal (tensor_split) windows",
        "needs one image of a fixed grid: refused on families with packed / dynamic visual tokens",
        "budget: k = round(keep*N) kept at layer K (as fastv)",
    ),
)
def fastv_window(ctx: SelectContext, layer: int, windows: int) -> torch.Tensor:
    """signals['last_query_attention']: [B, N] on grid ctx.grid -> [B, k] sorted indices."""
    del layer  # consumed by the intra-LLM stage
    grid = require_grid(ctx, "fastv_window")
    return window_fastv_select(ctx.signals["last_query_attention"], grid, ctx.n_keep, int(windows))
