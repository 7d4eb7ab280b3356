"""Random pruning baselines (UniPruneBench `methods/Random_PreLLM.py`, `Random_IntraLLM.py`;
papers/uniprunebench.txt §3.2): k of the N visual tokens drawn uniformly.

The draw is one seeded `randperm(N)[:k]` per image. `random_pre` hands the LLM the drawn tokens
in raster order (`order=raster`: ascending, as UniPruneBench's Qwen2.5-VL path, which sorts its
`keep_idx`) or in the draw's order (`order=shuffled`: as its InternVL path, which writes
`vit_embeds[perm[:k]]` into the first k image slots). Both keep the same tokens for a seed.
"""

from __future__ import annotations

import torch

from prunebench.checks import Kind
from prunebench.methods.base import Positions, SelectContext, Selection, Stage, register_method

ORDERS = ("raster", "shuffled")


def random_draw(ctx: SelectContext) -> torch.Tensor:
    """[B, N, D] -> [B, k] indices in draw order (one seeded randperm per row)."""
    b, n, _ = ctx.tokens.shape
    rows = [torch.randperm(n, generator=ctx.generator)[: ctx.n_keep] for _ in range(b)]
    return torch.stack(rows).to(ctx.tokens.device)


def random_select(ctx: SelectContext) -> torch.Tensor:
    """[B, N, D] -> [B, k] sorted indices, one seeded draw per row."""
    return random_draw(ctx).sort(dim=-1).values


def shuffled_selection(tokens: torch.Tensor, drawn: torch.Tensor) -> Selection:
    """tokens [B, N, D], drawn [B, k] (draw order) -> the kept slots (sorted: the image block's first
    k slots once the LLM entry closes it up) holding the drawn tokens in draw order: slot j gets
    tokens[drawn[j]]. Positions and masks belong to the slots, so the LLM reads the permutation."""
    values = tokens.gather(1, drawn[..., None].expand(-1, -1, tokens.shape[-1]))
    return Selection(index=drawn.sort(dim=-1).values, tokens=values)


@register_method(
    "random_pre",
    stage=Stage.PRE_LLM,
    source="papers/uniprunebench.txt §3.2 (Random, pre-LLM); UniPruneBench methods/Random_PreLLM.py "
    "(InternVL path) and custom_qwenvl.py (Qwen2.5-VL path)",
    dtype="no scoring (seeded random permutation)",
    rounding="round(keep*N) per image (n_keep_for, half up, >= 1)",
    positions=Positions.CONTIGUOUS,
    defaults={"order": "raster"},
    kinds={"order": Kind("str", choices=ORDERS)},
    deviations=(
        "budget: k = round-half-up(keep*N), at least 1 (n_keep_for, as every method here); UniPruneBench keeps "
        "int(keep*N) (floor; InternVL: at least 1, and the first tile and the other tiles each floored apart), so "
        "ours keeps one token more whenever frac(keep*N) >= 0.5 (e.g. 64 vs 63 of 576 at keep 0.111)",
        "order=raster (default): the kept tokens reach the LLM in raster order, as UniPruneBench's Qwen2.5-VL path "
        "(it sorts keep_idx); its InternVL path hands them on in random-permutation order (perm[:k]), which "
        "order=shuffled reproduces: the same tokens for a seed, in draw order, in the image block's slots",
        "order=shuffled: positions belong to the slots (contiguous for 1-D RoPE; on M-RoPE families slot j keeps "
        "the original ids of the j-th kept token in raster order, not those of the token placed there)",
        "RNG: a seeded torch.Generator per run, reseeded per sample (UniPruneBench: the global torch RNG)",
        "order=shuffled with k = N (keep=1.0): every token in raster order, the unpruned model (UniPruneBench would "
        "still permute them)",
    ),
)
def random_pre(ctx: SelectContext, order: str) -> torch.Tensor | Selection:
    if order == "raster" or ctx.n_keep >= ctx.tokens.shape[1]:
        return random_select(ctx)
    return shuffled_selection(ctx.tokens, random_draw(ctx))


@register_method(
    "random_intra",
    stage=Stage.INTRA_LLM,
    source="papers/uniprunebench.txt §3.2 (Random, intra-LLM, K=2); UniPruneBench methods/Random_IntraLLM.py",
    dtype="no scoring (seeded random permutation)",
    rounding="round(keep*N) of the visual tokens entering layer K (n_keep_for, half up, >= 1)",
    positions=Positions.CONTIGUOUS,  # UniPruneBench renumbers 1-D RoPE positions (METHODS.md §0.1)
    defaults={"layer": 2},
)
def random_intra(ctx: SelectContext, layer: int) -> torch.Tensor:
    del layer  # consumed by the intra-LLM stage
    return random_select(ctx)
