"""pooling_pre: average pooling after the projector, to exactly k tokens, at window centres."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prunebench.methods import METHODS
from prunebench.methods.base import SelectContext
from prunebench.methods.pooling_pre import pool_shape


@pytest.mark.parametrize(("k", "h", "w", "shape"), [(144, 24, 24, (12, 12)), (64, 24, 24, (8, 8)),
                                                    (128, 24, 24, (8, 16)), (192, 24, 24, (12, 16)),
                                                    (8, 4, 2, (4, 2)), (12, 3, 8, (2, 6))])
def test_pool_shape_is_an_exact_factorisation_near_the_aspect(k, h, w, shape):
    assert pool_shape(k, h, w) == shape


def test_pool_shape_without_a_fitting_factorisation_covers_k():
    m, n = pool_shape(29, 24, 24)  # 29 is prime and larger than a side
    assert m <= 24 and n <= 24 and m * n >= 29


def run(x, k, grid):
    ctx = SelectContext(tokens=x, n_keep=k, grid=grid, generator=torch.Generator().manual_seed(0))
    return METHODS.get("pooling_pre").fn(ctx)


@pytest.mark.parametrize(("k", "h", "w"), [(9, 6, 6), (4, 6, 6), (8, 6, 6), (6, 4, 9), (5, 6, 6)])
def test_pooled_values_and_positions(k, h, w):
    x = torch.randn(2, h * w, 5)
    out = run(x, k, (h, w))
    assert out.index.shape == (2, k) and out.tokens.shape == (2, k, 5)
    assert torch.equal(out.index, out.index.sort(dim=-1).values) and out.index.unique().numel() == k
    m, n = pool_shape(k, h, w)
    ref = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 5, h, w), (m, n)).flatten(2).transpose(1, 2)[:, :k]
    torch.testing.assert_close(out.tokens, ref)
    # each pooled token sits at the centre of its window
    for cell, idx in enumerate(out.index[0].tolist()):
        i, j = divmod(cell, n)
        r0, r1 = (i * h) // m, -((-(i + 1) * h) // m)
        c0, c1 = (j * w) // n, -((-(j + 1) * w) // n)
        assert divmod(idx, w) == ((r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2)


def test_keep_all_is_the_identity():
    x = torch.randn(1, 36, 4)
    out = run(x, 36, (6, 6))
    assert torch.equal(out.index[0], torch.arange(36)) and torch.equal(out.tokens, x)
