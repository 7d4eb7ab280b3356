"""adaptive_mi and cdpruner selections against definitions recomputed from scratch at every step."""

from __future__ import annotations

import math

import pytest
import torch

from prunebench.errors import UserError
from prunebench.methods.adaptive_mi_ops import (
    adaptive_mi_select,
    alignment_scores,
    check_stage1_ratio,
    diversity_greedy,
    stage1_size,
)
from prunebench.methods.cdpruner_ops import (
    cdpruner_select,
    check_theta,
    conditional_kernel,
    dpp_greedy_map,
    relevance_scores,
)


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- adaptive_mi ---------------------------------------------------------------------------


def cos(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def expected_distance(rows: list[list[float]], subset: list[int]) -> float:
    """Eq. 6: mean over ordered pairs i != j of the subset of 1 - cos."""
    pairs = [(i, j) for i in subset for j in subset if i != j]
    return sum(1 - cos(rows[i], rows[j]) for i, j in pairs) / len(pairs)


def naive_diversity(x: torch.Tensor, k: int) -> list[int]:
    """Seed by eq. 9-10; then each step adds the token maximising eq. 6 of the grown set, recomputed."""
    rows = x.tolist()
    n = len(rows)
    chosen = [min(range(n), key=lambda i: (sum(cos(rows[i], rows[j]) for j in range(n)) / n, i))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (expected_distance(rows, chosen + [i]), -i)))
    return chosen


def naive_adaptive_mi(x: torch.Tensor, text: torch.Tensor, k: int, ratio: float) -> list[int]:
    rows, texts = x.tolist(), text.tolist()
    alpha = [-sum(math.dist(r, t) for t in texts) / len(texts) for r in rows]
    n1 = min(len(rows), max(math.floor(ratio * len(rows)), k))
    first = sorted(sorted(range(len(rows)), key=lambda i: (-alpha[i], i))[:n1])
    picked = naive_diversity(x[first], k)
    return sorted(first[p] for p in picked)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("n", "d", "k"), [(20, 6, 5), (15, 4, 10), (9, 12, 8)])
def test_accelerated_greedy_equals_recomputed_objective(seed, n, d, k):
    x = rand(seed, 2, n, d)
    got = diversity_greedy(x, k)
    for bi in range(2):
        assert got[bi].tolist() == naive_diversity(x[bi], k)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("n", "m", "k", "ratio"), [(20, 3, 5, 0.8), (16, 5, 14, 0.8), (12, 1, 4, 0.5)])
def test_adaptive_mi_matches_two_stage_definition(seed, n, m, k, ratio):
    x, text = rand(seed, 2, n, 6), rand(seed + 100, 2, m, 6)
    got = adaptive_mi_select(x, text, k, ratio)
    for bi in range(2):
        assert got[bi].tolist() == naive_adaptive_mi(x[bi], text[bi], k, ratio)


def test_alignment_is_negative_mean_l2_distance():
    x, text = rand(5, 1, 7, 3), rand(6, 1, 4, 3)
    want = [-sum(math.dist(r, t) for t in text[0].tolist()) / 4 for r in x[0].tolist()]
    torch.testing.assert_close(alignment_scores(x, text)[0], torch.tensor(want, dtype=torch.float64))


def test_stage1_size_is_raised_to_the_budget():
    assert stage1_size(576, 64, 0.8) == 460
    assert stage1_size(10, 9, 0.8) == 9  # budget above floor(0.8 N): N1 = n_keep
    assert stage1_size(3, 1, 0.1) == 1


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.2, True, "0.8"])
def test_bad_stage1_ratio_is_a_user_error(ratio):
    with pytest.raises(UserError, match="stage1_ratio"):
        check_stage1_ratio(ratio)


# -- cdpruner ------------------------------------------------------------------------------


def naive_dpp_map(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy log-det maximisation: each step adds argmax_j det(L[S+j, S+j]), from scratch."""
    chosen: list[int] = []
    for _ in range(k):
        rest = [j for j in range(kernel.shape[0]) if j not in chosen]
        dets = [torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]).item() for j in rest]
        chosen.append(rest[max(range(len(rest)), key=lambda i: dets[i])])
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("n", "d", "k"), [(12, 16, 6), (10, 10, 10), (16, 20, 4)])
def test_fast_map_equals_naive_log_det_greedy(seed, n, d, k):
    f = rand(seed, 2, n, d)
    kernel = f @ f.transpose(1, 2) / d  # a random PSD kernel of full rank
    got = dpp_greedy_map(kernel, k)
    for bi in range(2):
        assert got[bi].tolist() == naive_dpp_map(kernel[bi], k)


@pytest.mark.parametrize(("negate", "theta"), [(False, None), (True, None), (False, 0.5)])
def test_conditional_kernel_selection_equals_naive(negate, theta):
    x, text = rand(7, 1, 14, 18), rand(8, 1, 3, 18)
    kernel = conditional_kernel(x, relevance_scores(x, text, negate), theta)
    # the kernel itself, from the definition
    rows, texts = x[0].tolist(), text[0].tolist()
    r = [sum(cos(v, t) for t in texts) / len(texts) for v in rows]
    r = [-v for v in r] if negate else r
    r = [(v - min(r) + 1e-6) / (max(r) - min(r)) for v in r]
    q = [math.exp(theta / (2 * (1 - theta)) * v) for v in r] if theta is not None else r
    want = torch.tensor([[q[i] * cos(rows[i], rows[j]) * q[j] for j in range(14)] for i in range(14)],
                        dtype=torch.float64)
    torch.testing.assert_close(kernel[0], want)
    got = cdpruner_select(x, text, 6, negate, theta)
    assert got[0].tolist() == sorted(naive_dpp_map(want, 6))


def test_relevance_sign_changes_the_selection():
    x, text = rand(9, 1, 30, 8), rand(10, 1, 2, 8)
    assert not torch.equal(cdpruner_select(x, text, 5, False), cdpruner_select(x, text, 5, True))


def test_rank_deficient_kernel_still_gives_distinct_picks():
    x, text = rand(11, 2, 40, 4), rand(12, 2, 3, 4)  # rank <= 4 < k
    for dtype in (torch.float64, torch.float32):
        got = cdpruner_select(x.to(dtype), text.to(dtype), 40)
        assert torch.equal(got, torch.arange(40).expand(2, 40))
        part = cdpruner_select(x.to(dtype), text.to(dtype), 12)
        assert all(row.unique().numel() == 12 for row in part)


@pytest.mark.parametrize("theta", [1.0, -0.1, "0.5", True])
def test_bad_theta_is_a_user_error(theta):
    with pytest.raises(UserError, match="theta"):
        check_theta(theta)
