"""FastV with the alpha balance of importance and redundancy (papers/are-we-solving-the-right-problem.txt
§6.3, eq. 6, footnote 2, Table 4).

    score_i = alpha * minmax(a_i) + (1 - alpha) * minmax(1 - cos(x_i, x_last))

a_i: FastV's importance, the last prompt token's head-mean attention to visual token i at layer K-1;
x_i, x_last: hidden states of visual token i and of the last prompt token entering layer K (the
"pattern uniqueness" term: 1 - cosine to the last token). Both terms are min-max normalised over the
visual tokens of the row (footnote 2) before mixing. The top-k by score are kept in order, with their
original positions (FastV). alpha = 1 is FastV's ranking; alpha = 0 ranks by dissimilarity only.
"""

from __future__ import annotations

import torch

from prunebench.methods.base import Positions, SelectContext, Stage, register_method, top_k_sorted


def minmax(x: torch.Tensor) -> torch.Tensor:
    """[B, N] -> [B, N] in [0, 1] per row; a constant row maps to 0."""
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo), torch.zeros_like(x))


def alpha_scores(attention: torch.Tensor, tokens: torch.Tensor, last: torch.Tensor, alpha: float) -> torch.Tensor:
    """attention [B, N], tokens [B, N, D], last [B, D] -> [B, N] float32 eq. 6 scores."""
    cos = torch.nn.functional.cosine_similarity(tokens.float(), last.float()[:, None, :], dim=-1)
    return alpha * minmax(attention.float()) + (1.0 - alpha) * minmax(1.0 - cos)


@register_method(
    "fastv_alpha",
    stage=Stage.INTRA_LLM,
    source="papers/are-we-solving-the-right-problem.txt §6.3 eq. 6 + footnote 2 (alpha balance on FastV)",
    needs=("last_query_attention", "last_token_hidden"),
    dtype="last-token row from layer K-1's q/k projections + RoPE in the model's dtype; q.k logits, softmax and "
    "head mean in float32 (stages/attention.py upcasts q and k); cosine to the last token's hidden state and "
    "min-max balance in float32",
    rounding="round(keep*N) of the visual tokens entering layer K (n_keep_for, half up, >= 1)",
    positions=Positions.ORIGINAL,  # as FastV
    defaults={"layer": 2, "alpha": 0.5},
    deviations=(
        "alpha = 0.5 by default: the paper sweeps 0..1 (Table 4; best 0.0-0.1 on perception, 0.8-0.9 on "
        "knowledge tasks) and names no default",
        "the similarity is taken between hidden states entering layer K (the paper does not say which layer)",
        "budget: k = round(keep*N) kept at layer K (as fastv)",
    ),
)
def fastv_alpha(ctx: SelectContext, layer: int, alpha: float) -> torch.Tensor:
    """signals: last_query_attention [B, N], last_token_hidden [B, D]; tokens [B, N, D] -> [B, k] sorted."""
    del layer  # consumed by the intra-LLM stage
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"fastv_alpha: alpha must be in [0, 1], got {alpha}")
    scores = alpha_scores(ctx.signals["last_query_attention"], ctx.tokens, ctx.signals["last_token_hidden"], alpha)
    return top_k_sorted(scores, ctx.n_keep)
