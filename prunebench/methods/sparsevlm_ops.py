"""SparseVLM's pure tensor functions (Gumpest/SparseVLMs, branches v1.5 and v2.0:
`llava/model/language_model/modelling_sparse_llama.py` `LlamaDynamicvitModel.forward`, `score.py`).

- `select_raters`: the text raters, chosen once on the LLM input embeddings (paper §3.2);
- `rater_scores`: the visual-token ranking at a pruning layer from the raters' attention rows, with
  SparseVLM+'s RoPE normalisation and priority-head selection for v2.0 (§4.2, §4.3);
- `sparsevlm_counts`: the per-stage kept counts (the official tables, scaled for other budgets).
"""

from __future__ import annotations

import math

import torch

from prunebench.methods.base import layer_average
from prunebench.methods.schedule_ops import closest_step

PAPER_LAYERS = 32
PAPER_RATING_LAYERS = (2, 6, 15)  # official pruning_loc: the attention of these layers rates, pruning after them
REFERENCE_N = 576  # LLaVA-1.5's visual tokens, for which the tables are written
# score.py: retained budget -> kept visual tokens after layers 2 / 6 / 15
TABLES: dict[str, dict[int, tuple[int, int, int]]] = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}


def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """visual [B, N, D], text [B, T, D] input embeddings -> [B, T] bool raters.

    m = mean over visual tokens of softmax over text tokens of V·Tᵀ; raters are the text tokens with
    m above its mean (official: `m_v_t = (v_t @ t_t^T).softmax(2).mean(1)`, `m_v_t > m_v_t.mean()`).
    """
    relevance = torch.einsum("bnd,btd->bnt", visual.float(), text.float()).softmax(dim=-1).mean(dim=1)
    return relevance > relevance.mean(dim=-1, keepdim=True)


def rater_scores(attention: torch.Tensor, raters: torch.Tensor, prior: torch.Tensor | None = None,
                 top_heads: int | None = None) -> torch.Tensor:
    """Visual-token scores from the rater rows at one layer: [B, N] float32.

    attention: [B, H, T, N] softmax rows of the T text tokens, visual columns; raters: [B, T] bool;
    prior: [B, T, N] RoPE-only logits (v2.0: attention / prior, the "gravity correction"); top_heads:
    keep the heads with the largest rater->visual mass (v2.0: 14). Score = mean over the (selected)
    heads, then over the raters.
    """
    attn = attention.float()
    if prior is not None:
        attn = attn / prior.float()[:, None]
    weight = raters.float()[:, None, :, None]  # [B, 1, T, 1]
    if top_heads is not None and top_heads < attn.shape[1]:
        mass = (attn * weight).sum(dim=(2, 3))  # [B, H]
        heads = mass.topk(top_heads, dim=-1).indices
        attn = attn.gather(1, heads[:, :, None, None].expand(-1, -1, *attn.shape[2:]))
    per_rater = attn.mean(dim=1)  # [B, T, N]
    return (per_rater * weight[:, 0]).sum(dim=1) / weight[:, 0].sum(dim=1).clamp(min=1.0)


def rating_layers(n_layers: int, layers: list[int] | None = None) -> list[int]:
    """The layers whose attention rates: given, or [2, 6, 15] of 32 scaled as round-half-up(l * L / 32)."""
    if layers is not None:
        return list(layers)
    return [math.floor(k * n_layers / PAPER_LAYERS + 0.5) for k in PAPER_RATING_LAYERS]


def scaled_table(reference: tuple[int, ...], n_in: int, scale: float) -> list[int]:
    """The table's fractions of 576 times `scale`, of n_in, floored, in [1, n_in], non-increasing."""
    out, cap = [], n_in
    for count in reference:
        cap = min(cap, max(1, math.floor(scale * count / REFERENCE_N * n_in)))
        out.append(cap)
    return out


def sparsevlm_counts(n_layers: int, stages: list[int], n_in: int, n_keep: int, version: str) -> list[int]:
    """Per-stage kept counts: the official table at N = 576 and a tabled budget; otherwise the table whose
    budget is nearest keep*576, scaled so the layer-averaged count is closest to n_keep."""
    table = TABLES[version]
    if n_in == REFERENCE_N and n_keep in table:
        return list(table[n_keep])
    reference = table[min(table, key=lambda b: (abs(b - n_keep * REFERENCE_N / n_in), b))]

    def avg(scale: float) -> float:
        return layer_average(n_layers, n_in, list(zip(stages, scaled_table(reference, n_in, scale), strict=True)))

    top = REFERENCE_N / min(reference) + 1.0  # every stage keeps all n_in from here on
    return scaled_table(reference, n_in, closest_step(avg, float(n_keep), 0.0, top))
