"""FastV_VIS (papers/are-we-solving-the-right-problem.txt §5.1, Table 3): FastV without language
guidance. The visual tokens are ranked by the attention row of the LAST VISUAL token at layer K-1
instead of the last prompt (text) token's; everything else is FastV (`prunebench.methods.fastv`).

The row is causal: the last visual token attends to the prompt up to and including itself, so the
score never sees the question. It is recomputed from layer K-1's post-RoPE q/k, as FastV's row.
"""

from __future__ import annotations

import torch

from prunebench.methods.base import Positions, SelectContext, Stage, register_method, top_k_sorted


@register_method(
    "fastv_vis",
    stage=Stage.INTRA_LLM,
    source="papers/are-we-solving-the-right-problem.txt §5.1 (FastV_VIS, Table 3); no code released",
    needs=("last_visual_query_attention",),
    dtype="last-visual-token row (causal) from layer K-1's q/k projections + RoPE in the model's dtype; q.k "
    "logits, softmax and head mean in float32 (stages/attention.py upcasts q and k)",
    rounding="round(keep*N) of the visual tokens entering layer K (n_keep_for, half up, >= 1)",
    positions=Positions.ORIGINAL,  # as FastV
    defaults={"layer": 2},
    deviations=(
        "the paper gives one sentence (score with the last visual token); K=2 and the FastV top-k are assumed",
        "several images in a prompt: the query is the last visual token of the whole prompt",
        "budget: k = round(keep*N) kept at layer K (as fastv)",
    ),
)
def fastv_vis(ctx: SelectContext, layer: int) -> torch.Tensor:
    """signals['last_visual_query_attention']: [B, N] -> [B, k] top-k indices, sorted."""
    del layer  # consumed by the intra-LLM stage
    scores = ctx.signals["last_visual_query_attention"]
    return top_k_sorted(scores, ctx.n_keep)
