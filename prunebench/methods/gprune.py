"""G-Prune (Jiang et al., AAAI 2025, "What kind of visual tokens do we need?", graph-based
propagation; the paper is not in papers/, so this follows the official repo jytmelon/G-Prune, `LLaVA-NeXT/llava/model/llava_arch.py` `prepare_inputs_labels_for_multimodal`,
hard-coded block after the image features are packed; METHODS.md "G-Prune").

After the projector, the visual tokens of an image form a graph whose edges are cosine
similarities >= tau, sharpened by a temperature T and row-normalised by a softmax. Each token's
initial information is its L2 norm; after n hops of propagation a token's score is the information
it receives divided by its degree. The top-k tokens by score are kept, in their original order.
Newline tokens (LLaVA-NeXT / OneVision) are always kept, as in the official code.
See `gprune_ops.gprune_scores`.
"""

from __future__ import annotations

import torch

from prunebench.methods.base import Positions, SelectContext, Stage, register_method, top_k_sorted
from prunebench.methods.gprune_ops import check_gprune_params, gprune_scores


@register_method(
    "gprune",
    stage=Stage.PRE_LLM,
    source="G-Prune (Jiang et al. 2025) graph propagation, METHODS.md card; jytmelon/G-Prune LLaVA-NeXT/llava/model/llava_arch.py",
    dtype="cosine graph, softmax propagation and scores in float32 (float64 inputs stay float64)",
    rounding="round(keep*N) per image (n_keep_for, half up, >= 1)",
    positions=Positions.CONTIGUOUS,  # pruned in prepare_inputs_labels_for_multimodal: positions close up
    defaults={"tau": 0.5, "temperature": 0.03, "iterations": 5},
    deviations=(
        "budget: k = round(keep*N) per image (official: int(0.5*N), floor, with keep_ratio hard-coded)",
        "budget unit: the whole packed image of LLaVA-NeXT / OneVision (base view + crops, newlines excluded "
        "and always kept); the official code prunes the 576-token base view and the high-res grid separately",
        "scores in float32 (official: the features' dtype, fp16 in LLaVA-NeXT); ties in the top-k go to the "
        "lower index (official: torch.topk, unspecified)",
        "runs on every family the pre-LLM stage supports (the official code covers LLaVA-NeXT only)",
        "w^T A^n is evaluated as n vector-matrix products (the same product, associated left to right; float "
        "rounding differs from A^n formed first; picks identical over 200 random graphs), O(n N^2) instead of "
        "O(N^3 log n): 2.8x faster at 2,880 tokens",
    ),
)
def gprune(ctx: SelectContext, tau: float, temperature: float, iterations: int) -> torch.Tensor:
    """tokens [B, N, D] -> [B, k] kept indices, sorted."""
    check_gprune_params(tau, temperature, iterations)
    return top_k_sorted(gprune_scores(ctx.tokens, tau, temperature, iterations), ctx.n_keep)
