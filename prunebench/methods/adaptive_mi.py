"""Adaptive mutual-information + diversity pruning (BAAI, later "TrimTokenator", arXiv 2509.00320;
papers/adaptive-mi-diversity-pruning.txt §3, eqs. 1-16; no official code; METHODS.md card).

Before the LLM, visual tokens only, text kept:
1. cross-modal alignment: alpha_i = -(1/M) sum_j ||x_i - t_j||_2 (eq. 3, the L2 approximation of
   the mutual information between visual token i and the M text tokens); keep the top N1 =
   floor(0.8 N) (eq. 4);
2. intra-modal diversity: greedy maximisation of the expected pairwise cosine distance among the
   kept tokens (eqs. 5-16, seed = least similar on average, then least similar to the selected set
   via the accumulated similarity vector) down to N2 = n_keep.

Embedding space (the paper leaves it open): the visual tokens are the post-projector features and
the text tokens are the LLM input embeddings (`text_embeddings`: the prompt's text after the last
visual token, i.e. the question plus the template's assistant prefix; every non-visual token when
none follows), both in the LLM's input space. See `adaptive_mi_ops.adaptive_mi_select`.
"""

from __future__ import annotations

import torch

from prunebench.methods.adaptive_mi_ops import adaptive_mi_select
from prunebench.methods.base import Positions, SelectContext, Stage, register_method


@register_method(
    "adaptive_mi",
    stage=Stage.PRE_LLM,
    source="papers/adaptive-mi-diversity-pruning.txt §3 eqs. 3-4 (alignment), 8-16 (greedy diversity); no code",
    needs=("text_embeddings",),
    dtype="L2 alignment and cosine diversity in float32 (float64 inputs stay float64)",
    rounding="N2 = round(keep*N) per image (n_keep_for, half up, >= 1); N1 = max(floor(stage1_ratio*N), N2)",
    cost="Eq. 3's distances to every text token are exact Euclidean ones (cdist without the matmul expansion, "
    "N*M*D work for M text tokens): at 576 tokens and 32 text tokens 2.7-3.0x the N x N cosine matrix, within "
    "1.2x of it at 2,880 and 10,816 (scripts/bench_selection.py, one CPU thread)",
    positions=Positions.CONTIGUOUS,  # pre-LLM, LLaVA prepare_inputs style: positions close up
    defaults={"stage1_ratio": 0.8},
    deviations=(
        "embedding space: post-projector visual features and LLM input embeddings of the text (the paper does "
        "not say which space); the text is the prompt after the last visual token (question + assistant prefix)",
        "N1 = max(floor(stage1_ratio * N), n_keep): when the budget exceeds stage 1's size, stage 1 keeps n_keep "
        "tokens and stage 2 keeps them all",
        "budget: N2 = round(keep*N) per image (newlines of packed families always kept, outside the budget)",
        "the selection runs at the LLM entry (the text is embedded after the projector); its time is the "
        "method span",
        "ties (alignment top-N1, greedy argmin) go to the lower index; float32 distances",
    ),
)
def adaptive_mi(ctx: SelectContext, stage1_ratio: float) -> torch.Tensor:
    """tokens [B, N, D], signals text_embeddings [B, M, D] -> [B, k] kept indices, sorted."""
    return adaptive_mi_select(ctx.tokens, ctx.signals["text_embeddings"], ctx.n_keep, stage1_ratio)
