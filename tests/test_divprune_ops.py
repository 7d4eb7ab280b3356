"""DivPrune greedy max-min selection against a pure-Python reference."""

from __future__ import annotations

import math

import pytest
import torch

from prunebench.methods.divprune_ops import divprune_select


def brute_divprune(x: torch.Tensor, k: int) -> list[int]:
    """O(N^2 k) loops on one [N, D] row, float64: first = max nearest-neighbour distance, then max-min."""
    rows = x.double().tolist()
    n = len(rows)
    norms = [math.sqrt(sum(c * c for c in r)) for r in rows]
    def cos(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(rows[i], rows[j], strict=True)) / (norms[i] * norms[j])

    dist = [[1 - cos(i, j) for j in range(n)] for i in range(n)]
    first = max(range(n), key=lambda i: min(dist[i][j] for j in range(n) if j != i))
    chosen = [first]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: min(dist[s][j] for s in chosen)))
    return sorted(chosen)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize(("n", "d", "k"), [(40, 16, 8), (25, 6, 12), (12, 3, 11)])
def test_divprune_matches_brute_force(seed: int, n: int, d: int, k: int) -> None:
    x = torch.randn(3, n, d, generator=torch.Generator().manual_seed(seed))
    got = divprune_select(x, k)
    assert got.shape == (3, k) and got.dtype == torch.long
    for bi in range(3):
        assert got[bi].tolist() == brute_divprune(x[bi], k)


def test_divprune_sorted_distinct_and_full() -> None:
    x = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(9))
    got = divprune_select(x, 10)
    assert (got[:, 1:] > got[:, :-1]).all()  # sorted and distinct
    assert torch.equal(divprune_select(x, 30), torch.arange(30).expand(2, 30))
    assert divprune_select(x[:, :1], 1).tolist() == [[0], [0]]


def test_divprune_first_pick_is_most_isolated() -> None:
    # Three near-duplicates and one outlier direction: k=1 must pick the outlier.
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [1.0, -0.01], [0.0, 1.0]]])
    assert divprune_select(x, 1).tolist() == [[3]]
    assert divprune_select(x, 2).tolist() == [[2, 3]]  # then the one farthest from token 3


def test_divprune_duplicates_still_distinct() -> None:
    # All tokens identical: the official loop could re-pick a selected token; ours stays distinct.
    x = torch.ones(1, 6, 4)
    assert divprune_select(x, 4).unique().numel() == 4


def test_divprune_half_precision_input() -> None:
    x = torch.randn(1, 20, 8, generator=torch.Generator().manual_seed(4))
    assert divprune_select(x.bfloat16(), 5).tolist() == [brute_divprune(x.bfloat16().float()[0], 5)]


@pytest.mark.parametrize("k", [0, 31])
def test_divprune_bad_k(k: int) -> None:
    with pytest.raises(ValueError, match="k must be"):
        divprune_select(torch.randn(1, 30, 4), k)
