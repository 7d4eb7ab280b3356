"""Adaptive mutual-information + diversity pruning (BAAI; papers/adaptive-mi-diversity-pruning.txt,
eqs. 3-4 and 8-16). No model code here."""

from __future__ import annotations

import math

import torch

from prunebench.errors import UserError
from prunebench.methods.base import top_k_sorted


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))  # float32, or float64 kept for tests


def check_stage1_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 < float(ratio) <= 1.0:
        raise UserError(f"adaptive_mi: stage1_ratio (N1 / N) must be a fraction in (0, 1], got {ratio}")


def alignment_scores(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eq. 3: visual [B, N, D], text [B, M, D] -> alpha [B, N] = -(1/M) sum_j ||x_i - t_j||_2."""
    dist = torch.cdist(_work(x), _work(text).to(_work(x).dtype), compute_mode="donot_use_mm_for_euclid_dist")
    return -dist.mean(dim=-1)


def stage1_size(n: int, n_keep: int, ratio: float) -> int:
    """N1 = floor(ratio * N) (paper §4: 0.8), raised to n_keep when the budget asks for more tokens
    than stage 1 keeps (then stage 2 chooses n_keep of N1 = n_keep, i.e. keeps stage 1's set)."""
    return min(n, max(math.floor(ratio * n), n_keep, 1))


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """Eq. 8: [B, N, D] -> [B, N, N] cosine similarities (zero vectors: cos 0)."""
    xn = torch.nn.functional.normalize(_work(x), p=2, dim=-1)
    return xn @ xn.transpose(1, 2)


def diversity_greedy(x: torch.Tensor, k: int) -> torch.Tensor:
    """Eqs. 8-16: [B, N, D] -> [B, k] indices in pick order.

    Seed: argmin of the mean similarity to all N tokens (eq. 9-10, self included as in eq. 9); then
    t = 2..k: argmin over the remaining tokens of sigma / (t - 1), sigma the accumulated similarity
    to the selected set (eqs. 13-16). Minimising the mean similarity to the selected set is the
    greedy step of eq. 6/7 (max expected pairwise cosine distance). Ties go to the lower index.
    """
    c = cosine_matrix(x)
    b, n, _ = c.shape
    rows = torch.arange(b, device=c.device)
    pick = c.mean(dim=-1).argmin(dim=-1)
    sigma = torch.zeros(b, n, dtype=c.dtype, device=c.device)
    taken = torch.zeros(b, n, dtype=torch.bool, device=c.device)
    picks = []
    for _ in range(k):
        picks.append(pick)
        taken[rows, pick] = True
        sigma = sigma + c[rows, pick]  # eq. 16 (eq. 12 for the seed)
        pick = sigma.masked_fill(taken, float("inf")).argmin(dim=-1)  # eq. 14; 1/(t-1) does not move argmin
    return torch.stack(picks, dim=-1)


def adaptive_mi_select(x: torch.Tensor, text: torch.Tensor, n_keep: int, stage1_ratio: float = 0.8) -> torch.Tensor:
    """visual [B, N, D], text [B, M, D] -> [B, n_keep] kept indices, sorted.

    Stage 1 keeps the top N1 by alignment (eq. 4), stage 2 the n_keep most diverse of those.
    """
    check_stage1_ratio(stage1_ratio)
    n1 = stage1_size(x.shape[1], n_keep, stage1_ratio)
    first = top_k_sorted(alignment_scores(x, text), n1)  # [B, N1]
    kept = x.gather(1, first[..., None].expand(-1, -1, x.shape[-1]))
    second = diversity_greedy(kept, n_keep)
    return first.gather(1, second).sort(dim=-1).values
