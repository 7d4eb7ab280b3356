"""G-Prune graph propagation (Jiang et al., AAAI 2025; METHODS.md "G-Prune"). No model code here."""

from __future__ import annotations

import torch

from prunebench.errors import UserError

_ZEROED = -5000.0  # official: entries zeroed by the threshold become -5000 before the row softmax


def check_gprune_params(tau: float, temperature: float, iterations: int) -> None:
    """Bad hyper-parameters -> UserError naming the valid range."""
    if not -1.0 <= float(tau) <= 1.0:
        raise UserError(f"gprune: tau (similarity threshold) must be in [-1, 1], got {tau}")
    if not float(temperature) > 0.0:
        raise UserError(f"gprune: temperature must be > 0, got {temperature}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise UserError(f"gprune: iterations must be an integer >= 1, got {iterations}")


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 kept (tests against float64 references)."""
    return torch.promote_types(x.dtype, torch.float32)


def propagation_matrix(x: torch.Tensor, tau: float, temperature: float) -> torch.Tensor:
    """[B, N, D] -> [B, N, N] row-stochastic transition matrix of the similarity graph.

    Official order (jytmelon/G-Prune LLaVA-NeXT/llava/model/llava_arch.py, after encode_images):
    cosine A, A[A < tau] = 0, A / T, |A| < 1e-6 -> -5000 (no edge), softmax over each row.
    """
    xf = x.to(_work_dtype(x))
    xn = torch.nn.functional.normalize(xf, p=2, dim=-1)
    a = xn @ xn.transpose(1, 2)
    a = a.masked_fill(a < tau, 0.0) / temperature
    a = a.masked_fill(a.abs() < 1e-6, _ZEROED)
    return torch.softmax(a, dim=-1)


def gprune_scores(x: torch.Tensor, tau: float = 0.5, temperature: float = 0.03, iterations: int = 5) -> torch.Tensor:
    """[B, N, D] -> [B, N] information each token holds after `iterations` propagation hops.

    score_j = (w^T A^n)_j / d_j with w_i = ||x_i||_2 (the token's initial information) and d_j the
    number of non-zero entries of row j of A after the softmax (its degree; exp(-5000 - max)
    underflows to exactly 0, so the degree counts the edges kept by the threshold, self included).
    """
    a = propagation_matrix(x, tau, temperature)
    degree = (a > 0).sum(dim=-1).to(a.dtype)
    flow = x.to(a.dtype).norm(dim=-1)[:, None, :]  # [B, 1, N]
    for _ in range(iterations):  # w^T A^n as n vector-matrix products: O(n N^2), not matrix_power's O(N^3 log n)
        flow = flow @ a
    return flow[:, 0] / degree
