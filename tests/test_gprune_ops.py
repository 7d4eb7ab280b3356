"""G-Prune scores against a pure-Python loop of the card's definition (METHODS.md "G-Prune")."""

from __future__ import annotations

import math

import pytest
import torch

from prunebench.errors import UserError
from prunebench.methods.base import top_k_sorted
from prunebench.methods.gprune_ops import check_gprune_params, gprune_scores


def naive_scores(x: torch.Tensor, tau: float, temperature: float, n: int) -> list[float]:
    """One [N, D] image in float64 loops: thresholded cosine / T, -5000 for no edge, row softmax,
    degree = non-zeros per row, score = (w^T A^n)_j / d_j with w_i = ||x_i||."""
    rows = x.double().tolist()
    size = len(rows)
    norms = [math.sqrt(sum(c * c for c in r)) for r in rows]
    cos = [[sum(a * b for a, b in zip(rows[i], rows[j], strict=True)) / (norms[i] * norms[j])
            for j in range(size)] for i in range(size)]
    logits = [[(c if c >= tau else 0.0) / temperature for c in row] for row in cos]
    logits = [[-5000.0 if abs(v) < 1e-6 else v for v in row] for row in logits]
    a = []
    for row in logits:
        top = max(row)
        e = [math.exp(v - top) for v in row]
        a.append([v / sum(e) for v in e])
    degree = [sum(1 for v in row if v > 0) for row in a]
    flow = norms[:]  # w^T A^n, one hop at a time
    for _ in range(n):
        flow = [sum(flow[i] * a[i][j] for i in range(size)) for j in range(size)]
    return [flow[j] / degree[j] for j in range(size)]


def clustered(seed: int, b: int, n: int, d: int) -> torch.Tensor:
    """Tokens around a few directions, so the threshold leaves a non-trivial graph."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, d, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 4, (b, n), generator=g)
    scale = torch.rand(b, n, 1, generator=g, dtype=torch.float64) * 2 + 0.5
    return (centres[pick] + 0.6 * torch.randn(b, n, d, generator=g, dtype=torch.float64)) * scale


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("n", "d", "tau", "temperature", "iters"),
                         [(20, 8, 0.5, 0.03, 5), (15, 5, 0.2, 0.1, 3), (12, 6, 0.8, 0.5, 1)])
def test_gprune_scores_match_naive_loops(seed, n, d, tau, temperature, iters):
    x = clustered(seed, 2, n, d)
    got = gprune_scores(x, tau, temperature, iters)
    for bi in range(2):
        want = torch.tensor(naive_scores(x[bi], tau, temperature, iters), dtype=torch.float64)
        torch.testing.assert_close(got[bi], want, rtol=1e-9, atol=1e-12)
        k = n // 3
        expected = sorted(sorted(range(n), key=lambda j: (-want[j].item(), j))[:k])
        assert top_k_sorted(got[bi : bi + 1], k)[0].tolist() == expected


def test_degree_counts_edges_above_threshold():
    # Two tight pairs far apart: each token has itself and its partner as edges (degree 2).
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]]], dtype=torch.float64)
    want = naive_scores(x[0], 0.5, 0.03, 5)
    torch.testing.assert_close(gprune_scores(x), torch.tensor([want], dtype=torch.float64))
    # the isolated-by-norm token: a larger norm carries more information to its neighbourhood
    x[0, 0] *= 3
    assert gprune_scores(x)[0, :2].min() > gprune_scores(x)[0, 2:].max()


def test_float32_inputs_give_float32_scores():
    x = clustered(3, 1, 10, 4).float()
    assert gprune_scores(x).dtype == torch.float32
    torch.testing.assert_close(gprune_scores(x).double(), gprune_scores(x.double()), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("tau", "temperature", "iters"), [(1.5, 0.03, 5), (0.5, 0.0, 5), (0.5, 0.03, 0),
                                                           (0.5, 0.03, 2.5)])
def test_bad_parameters_are_user_errors(tau, temperature, iters):
    with pytest.raises(UserError, match="gprune"):
        check_gprune_params(tau, temperature, iters)


def test_left_to_right_propagation_picks_as_the_matrix_power():
    """The vector-matrix form of w^T A^n keeps the tokens the official A^n form keeps."""
    from prunebench.methods.gprune_ops import gprune_scores, propagation_matrix

    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        n, d = int(torch.randint(20, 300, (1,), generator=g)), int(torch.randint(8, 128, (1,), generator=g))
        x = torch.randn(1, n, d, generator=g) + 2 * torch.randn(1, 1, d, generator=g)  # a graph with edges
        a = propagation_matrix(x, 0.5, 0.03)
        power = (x.norm(dim=-1)[:, None, :] @ torch.linalg.matrix_power(a, 5))[:, 0] / (a > 0).sum(-1)
        k = max(1, round(0.111 * n))
        ours = gprune_scores(x)
        torch.testing.assert_close(ours, power, rtol=1e-4, atol=1e-6)
        assert torch.equal(ours.topk(k).indices.sort().values, power.topk(k).indices.sort().values)
