"""Reverse FastV (papers/are-we-solving-the-right-problem.txt, Appendix B, Algorithm 2; Table 1).

NON-CANONICAL: a sanity check of FastV's ranking, not a pruning method anyone proposes. Everything
is FastV (`prunebench.methods.fastv`) except the choice: the k visual tokens the last prompt token
attends to LEAST at layer K-1 are kept (Algorithm 2 negates the scores and takes the top-k). If the
attention ranking carries information, this should do worse than FastV and than Random; the paper
reports 61.8% of the unpruned average at 75% reduction on LLaVA-1.5-7B.
"""

from __future__ import annotations

import torch

from prunebench.methods.base import Positions, SelectContext, Stage, register_method, top_k_sorted


@register_method(
    "fastv_reverse",
    stage=Stage.INTRA_LLM,
    source="papers/are-we-solving-the-right-problem.txt App. B Algorithm 2 (Reverse FastV); no code released",
    needs=("last_query_attention",),
    dtype="last-token row from layer K-1's q/k projections + RoPE in the model's dtype; q.k logits, softmax and "
    "head mean in float32 (stages/attention.py upcasts q and k); bottom-k",
    rounding="round(keep*N) of the visual tokens entering layer K (n_keep_for, half up, >= 1)",
    positions=Positions.ORIGINAL,  # as FastV: Algorithm 2 only changes the selection
    defaults={"layer": 2},
    deviations=(
        "non-canonical: a sanity check of FastV's attention ranking (bottom-k), not a proposed method",
        "budget: k = round(keep*N) kept at layer K (Algorithm 2 writes floor(N*r))",
        "attention row recomputed from layer K-1 q/k instead of eager output_attentions: the same row in fp32; "
        "eager attention takes the q.k logits in the model's dtype, so under fp16/bf16 the values differ in the "
        "last bits and a near-tie can rank otherwise",
    ),
)
def fastv_reverse(ctx: SelectContext, layer: int) -> torch.Tensor:
    """signals['last_query_attention']: [B, N] -> [B, k] bottom-k indices, sorted."""
    del layer  # consumed by the intra-LLM stage
    scores = ctx.signals["last_query_attention"]
    return top_k_sorted(scores, ctx.n_keep, largest=False)
