"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for
Token Pruning in MLLMs", arXiv 2506.10967 §3; official Theia-4869/CDPruner
`llava/model/llava_arch.py` `encode_images`, `multimodal_encoder/clip_encoder.py`; METHODS.md card).

Before the LLM: the kernel of a conditional DPP is L = diag(r) S diag(r), with S the cosine
similarity of the post-projector visual features and r the min-max normalised relevance of each
visual token to the question; the greedy fast MAP inference (incremental Cholesky) keeps T tokens,
in their original order.

Embedding space: the official code takes r from CLIP space (image patches through post_layernorm +
visual_projection, against CLIP-text embeddings of the question). The CLIP text tower is not part
of HF LLaVA checkpoints (nor of the other families), so, as the OpenVINO genai_opt port does
(openvino_contrib modules/genai_optimizations/genai_opt/visual_token_pruning.py), r is computed
between the post-projector visual features and the LLM input embeddings of the text
(`text_embeddings`: the prompt after the last visual token, i.e. the question plus the template's
assistant prefix; every non-visual token when none follows).

Sign: the official code negates the cosine (r = minmax(-mean cos)), which its author says is
intentional for CLIP/LLaVA's CLIP space (CDPruner issues #9, #14; flagged as contradicting the
paper in #19, #22). That argument is about CLIP's space, not ours, so the default here is the
paper's sign (more similar to the text = more relevant, `negate_relevance: false`);
`negate_relevance: true` reproduces the official/OpenVINO sign.
"""

from __future__ import annotations

import torch

from prunebench.errors import UserError
from prunebench.methods.base import Positions, SelectContext, Stage, register_method
from prunebench.methods.cdpruner_ops import cdpruner_select


@register_method(
    "cdpruner",
    stage=Stage.PRE_LLM,
    source="arXiv 2506.10967 §3 (conditional DPP, fast greedy MAP); Theia-4869/CDPruner llava/model/llava_arch.py "
    "encode_images",
    needs=("text_embeddings",),
    dtype="relevance, kernel and greedy DPP in float32 (float64 inputs stay float64)",
    rounding="round(keep*N) per image (n_keep_for, half up, >= 1)",
    positions=Positions.CONTIGUOUS,  # pruned in prepare_inputs_labels_for_multimodal: positions close up
    defaults={"negate_relevance": False, "theta": None},
    deviations=(
        "relevance from post-projector visual features vs LLM input embeddings of the text (official: CLIP image "
        "embeddings vs CLIP-text embeddings of the question, answer-format suffix stripped, 77-token chunks), as the "
        "OpenVINO genai_opt port; the text is the prompt after the last visual token (question + assistant prefix)",
        "relevance sign: the paper's (negate_relevance=false) by default, since the official negation is argued for "
        "CLIP space only; negate_relevance=true gives the official sign",
        "min-max normalisation per image (official: over the whole batch of crops; the same for one image)",
        "once the largest residual d^2 is numerically zero (k above the kernel's rank, e.g. k > feature dimension) "
        "the remaining picks follow the residuals without updates (official: sqrt of a non-positive residual, NaN "
        "and repeated picks); picks stay distinct",
        "budget: T = round(keep*N) per image (LLaVA-NeXT official: T per crop; here per packed image, newlines "
        "always kept outside the budget)",
        "the selection runs at the LLM entry (the text is embedded after the projector); its time is the method span",
        "theta mode off by default (as the official LLaVA code); theta in [0, 1) enables it (OpenVINO default 0.5)",
    ),
)
def cdpruner(ctx: SelectContext, negate_relevance: bool, theta: float | None) -> torch.Tensor:
    """tokens [B, N, D], signals text_embeddings [B, M, D] -> [B, k] kept indices, sorted."""
    if not isinstance(negate_relevance, bool):
        raise UserError(f"cdpruner: negate_relevance must be true or false, got {negate_relevance!r}")
    return cdpruner_select(ctx.tokens, ctx.signals["text_embeddings"], ctx.n_keep, negate_relevance, theta)
