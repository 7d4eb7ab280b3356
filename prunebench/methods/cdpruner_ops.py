"""CDPruner: conditional DPP with greedy fast MAP inference (Zhang et al. 2025, arXiv 2506.10967;
Theia-4869/CDPruner `llava/model/llava_arch.py` `encode_images`). No model code here."""

from __future__ import annotations

import torch

from prunebench.errors import UserError

# A residual d^2 at or below this many machine epsilons of the largest L_jj counts as zero: the kernel's
# rank is spent (official: no guard, the sqrt of a non-positive residual gives NaN and repeated picks).
_RANK_TOL = 16


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))  # float32, or float64 kept for tests


def check_theta(theta: float | None) -> None:
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, int | float)
                              or not 0.0 <= float(theta) < 1.0):
        raise UserError(f"cdpruner: theta must be null (off) or a number in [0, 1), got {theta}")


def relevance_scores(x: torch.Tensor, text: torch.Tensor, negate: bool) -> torch.Tensor:
    """visual [B, N, D], text [B, M, D] -> [B, N] relevance in (0, 1].

    Official: r = mean_m cos(e_i, t_m), negated (for CLIP space), then (r - min + 1e-6) / (max - min)
    per image. A constant r (no spread) gives 1 everywhere (official: division by zero).
    """
    xn = torch.nn.functional.normalize(_work(x), p=2, dim=-1)
    tn = torch.nn.functional.normalize(_work(text).to(xn.dtype), p=2, dim=-1)
    r = (xn @ tn.transpose(1, 2)).mean(dim=-1)
    if negate:
        r = -r
    lo, hi = r.amin(dim=-1, keepdim=True), r.amax(dim=-1, keepdim=True)
    return torch.where(hi > lo, (r - lo + 1e-6) / (hi - lo), torch.ones_like(r))


def conditional_kernel(x: torch.Tensor, relevance: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """features [B, N, D], relevance [B, N] -> L [B, N, N] = diag(q) S diag(q), S = cos(x_i, x_j).

    q = relevance, or exp(theta / (2 (1 - theta)) * relevance) in theta mode (paper eq. for the
    quality/diversity trade-off; commented out in the official LLaVA code).
    """
    xn = torch.nn.functional.normalize(_work(x), p=2, dim=-1)
    sim = xn @ xn.transpose(1, 2)
    q = relevance.to(sim.dtype)
    if theta is not None:
        q = torch.exp(theta / (2 * (1 - theta)) * q)
    return q[:, :, None] * sim * q[:, None, :]


def dpp_greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP of a DPP by incremental Cholesky (Chen et al. 2018, as in the official code):
    kernel [B, N, N] PSD -> [B, k] indices in pick order.

    d_j^2 = L_jj initially; each step picks j = argmax d^2 (the largest log-det gain), forms
    e = (L_j - sum_t c_t[j] c_t) / d_j, and updates d^2 -= e^2. Picked tokens are masked with -inf.
    Once the largest residual is numerically zero (k above the kernel's rank: every further pick adds
    nothing to the log-det), the remaining picks follow the residuals without further updates.
    """
    b, n, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    d2 = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    tol = _RANK_TOL * torch.finfo(kernel.dtype).eps * d2.amax(dim=-1).clamp_min(torch.finfo(kernel.dtype).tiny)
    cis = kernel.new_zeros(k, b, n)
    picks = []
    for i in range(k):
        j = d2.argmax(dim=-1)
        picks.append(j)
        dj = d2[rows, j]
        live = dj > tol
        proj = torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])
        e = (kernel[rows, j] - proj) / torch.where(live, dj, torch.ones_like(dj)).sqrt()[:, None]
        e = torch.where(live[:, None], e, torch.zeros_like(e))
        cis[i] = e
        d2 = d2 - e.square()
        d2[rows, j] = float("-inf")
    return torch.stack(picks, dim=-1)


def cdpruner_select(x: torch.Tensor, text: torch.Tensor, n_keep: int, negate: bool = False,
                    theta: float | None = None) -> torch.Tensor:
    """visual [B, N, D], text [B, M, D] -> [B, n_keep] kept indices, sorted."""
    check_theta(theta)
    kernel = conditional_kernel(x, relevance_scores(x, text, negate), theta)
    return dpp_greedy_map(kernel, n_keep).sort(dim=-1).values
