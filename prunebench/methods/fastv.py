"""FastV (Chen et al., ECCV 2024, "An image is worth 1/2 tokens after layer 2"; official repo
pkunlp-icler/FastV, `modeling_llama.py` `LlamaModel.forward` / HF `fastv_forward`).

At LLM layer K the visual tokens are ranked by the attention the last prompt token pays them in
layer K-1 (head mean), the top-k are kept in order and the rest are dropped; kept tokens keep their
original RoPE positions. The attention row is recomputed from layer K-1's own post-RoPE q/k
(METHODS.md §0.3), so SDPA/FlashAttention stay on and nothing runs twice.
"""

from __future__ import annotations

import torch

from prunebench.methods.base import Positions, SelectContext, Stage, register_method, top_k_sorted


@register_method(
    "fastv",
    stage=Stage.INTRA_LLM,
    source="Chen et al. 2024 §4 (FastV, K=2); pkunlp-icler/FastV src/transformers/.../modeling_llama.py",
    needs=("last_query_attention",),
    dtype="last-token row from layer K-1's q/k projections + RoPE in the model's dtype; q.k logits, softmax and "
    "head mean in float32 (stages/attention.py upcasts q and k)",
    rounding="round(keep*N) of the visual tokens entering layer K (n_keep_for, half up, >= 1)",
    positions=Positions.ORIGINAL,
    defaults={"layer": 2},
    deviations=(
        "budget: k = round(keep*N) tokens kept at layer K (the paper's R = 1 - keep); the FLOPs-equivalent "
        "mapping k' = (L*k - K*N)/(L-K) is not applied",
        "attention row recomputed from layer K-1 q/k instead of eager output_attentions: the same row in fp32; "
        "eager attention takes the q.k logits in the model's dtype, so under fp16/bf16 the values differ in the "
        "last bits and a near-tie can rank otherwise",
    ),
)
def fastv(ctx: SelectContext, layer: int) -> torch.Tensor:
    """signals['last_query_attention']: [B, N] -> [B, k] top-k indices, sorted."""
    del layer
    scores = ctx.signals["last_query_attention"]
    return top_k_sorted(scores, ctx.n_keep)
