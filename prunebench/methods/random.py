"""Random pruning baselines (UniPruneBench `methods/Random_PreLLM.py`, `Random_IntraLLM.py`;
papers/uniprunebench.txt §3.2): k of the N visual tokens drawn uniformly, kept in order."""

from __future__ import annotations

import torch

from prunebench.methods.base import Positions, SelectContext, Stage, register_method


def random_select(ctx: SelectContext) -> torch.Tensor:
    """[B, N, D] -> [B, k] sorted indices, one seeded draw per row."""
    b, n, _ = ctx.tokens.shape
    rows = [torch.randperm(n, generator=ctx.generator)[: ctx.n_keep] for _ in range(b)]
    return torch.stack(rows).sort(dim=-1).values.to(ctx.tokens.device)


@register_method(
    "random_pre",
    stage=Stage.PRE_LLM,
    source="papers/uniprunebench.txt §3.2 (Random, pre-LLM); UniPruneBench methods/Random_PreLLM.py",
    positions=Positions.CONTIGUOUS,
)
def random_pre(ctx: SelectContext) -> torch.Tensor:
    return random_select(ctx)


@register_method(
    "random_intra",
    stage=Stage.INTRA_LLM,
    source="papers/uniprunebench.txt §3.2 (Random, intra-LLM, K=2); UniPruneBench methods/Random_IntraLLM.py",
    positions=Positions.CONTIGUOUS,  # UniPruneBench renumbers 1-D RoPE positions (METHODS.md §0.1)
    defaults={"layer": 2},
)
def random_intra(ctx: SelectContext, layer: int) -> torch.Tensor:
    del layer  # consumed by the intra-LLM stage
    return random_select(ctx)
