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


def recycled_count(n_before: int, n_kept: int) -> int:
    """Clusters a v1.5 stage inserts when it drops n_before - n_kept tokens: the top 30% (+1) of the
    dropped are clustered into int(that / 10) + 1 (modelling_sparse_llama.py)."""
    return int((int((n_before - n_kept) * 0.3) + 1) / 10) + 1


def dpc_knn_merge(x: torch.Tensor, n_clusters: int, noise: torch.Tensor) -> torch.Tensor:
    """DPC-kNN clustering and merging (utils.py `cluster_and_merge`): x [B, M, C] -> [B, n_clusters, C].

    Distances d_ij = ||x_i - x_j|| / sqrt(C); density rho_i = exp(-mean of the squared distances to the
    n_clusters nearest (self included)) + noise_i (official: rand * 1e-6, here given: [B, M]); delta_i =
    distance to the nearest denser token (the largest distance when none is denser); the centres are the
    n_clusters tokens with the largest delta * rho, in that order; every token joins its nearest centre
    (centres join themselves) and each cluster is the mean of its members (sum / (count + 1e-6)).
    """
    b, m, c = x.shape
    xf = x.float()
    dist = torch.cdist(xf, xf) / c**0.5  # [B, M, M]
    nearest = dist.topk(n_clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp() + noise.float()
    denser = (density[:, None, :] > density[:, :, None]).float()  # [b, i, j]: rho_j > rho_i
    far = dist.flatten(1).max(dim=-1).values[:, None, None]
    delta = (dist * denser + far * (1 - denser)).min(dim=-1).values
    centres = (delta * density).topk(n_clusters, dim=-1).indices  # [B, n_clusters]
    to_centre = dist.gather(1, centres[..., None].expand(-1, -1, m))  # [B, n_clusters, M]
    assign = to_centre.argmin(dim=1)  # [B, M]
    assign.scatter_(1, centres, torch.arange(n_clusters, device=x.device).expand(b, -1))
    counts = torch.zeros(b, n_clusters, device=x.device).scatter_add_(1, assign, torch.ones(b, m, device=x.device))
    sums = torch.zeros(b, n_clusters, c, device=x.device).scatter_add_(1, assign[..., None].expand(-1, -1, c), xf)
    return (sums / (counts[..., None] + 1e-6)).to(x.dtype)


def recycle(tokens: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor, generator: torch.Generator
            ) -> torch.Tensor:
    """v1.5 token recycling: tokens [B, N, D], scores [B, N], kept [B, k] sorted -> [B, n_clusters, D].

    The dropped tokens (in sequence order) are ranked by score; the top int(0.3 * dropped) + 1 are
    DPC-kNN clustered into int(that / 10) + 1 merged tokens (clusters in centre order)."""
    b, n, d = tokens.shape
    dropped_mask = torch.ones(b, n, dtype=torch.bool, device=tokens.device).scatter(1, kept, False)
    dropped = dropped_mask.nonzero()[:, 1].view(b, -1)  # [B, n - k], ascending
    top = int(dropped.shape[1] * 0.3) + 1
    chosen = dropped.gather(1, scores.gather(1, dropped).topk(top, dim=-1).indices)
    picked = tokens.gather(1, chosen[..., None].expand(-1, -1, d))
    noise = torch.rand(b, top, generator=generator).to(tokens.device) * 1e-6
    return dpc_knn_merge(picked, int(top / 10) + 1, noise)
