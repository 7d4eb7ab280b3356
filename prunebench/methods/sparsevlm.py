"""SparseVLM (Zhang et al., ICML 2025, "SparseVLM: visual token sparsification for efficient VLM
inference", v1.5) and SparseVLM+ (`version: "2.0"`); official repo Gumpest/SparseVLMs, branches v1.5 and
v2.0: `llava/model/language_model/modelling_sparse_llama.py` (`LlamaDynamicvitModel.forward`), `score.py`
(`attn_postprocess_topk`, `select_attn_head_by_sum`, the schedule tables), `utils.py`.

Text raters are chosen once on the LLM input embeddings (`select_raters`). After each rating layer
l in {2, 6, 15} the visual tokens are ranked by the head-mean attention the raters pay them in layer l,
averaged over raters, and the top k_l are kept in order. Here that is stage K = l + 1: the raters'
rows are recomputed from layer l's captured post-RoPE q/k (only those rows, never the L x L map).
v1.5 renumbers positions contiguously; v2.0 divides the attention by the RoPE-only map (q = k = 1),
ranks with the 14 heads of largest rater->visual mass and keeps the original positions.
"""

from __future__ import annotations

import torch

from prunebench.errors import UserError
from prunebench.methods.base import (
    Insertion,
    IntraSchedule,
    Positions,
    SelectContext,
    Stage,
    register_method,
    top_k_sorted,
)
from prunebench.methods.sparsevlm_ops import (
    TABLES,
    rater_scores,
    rating_layers,
    recycle,
    recycled_count,
    sparsevlm_counts,
)

PRIORITY_HEADS = 14  # score.py select_attn_head_by_sum: topk(14)


def _version(version: str) -> str:
    if str(version) not in TABLES:
        raise UserError(f"sparsevlm: version must be one of {', '.join(TABLES)}, got {version!r}")
    return str(version)


def stage_layers(n_layers: int, layers: list[int] | None = None, **_: object) -> list[int]:
    """Prune entering layer l + 1 for each rating layer l."""
    if layers is not None and (not isinstance(layers, (list, tuple)) or not all(isinstance(k, int) for k in layers)):
        raise UserError(f"sparsevlm: layers must be null or a list of rating-layer indices, got {layers!r}")
    return [k + 1 for k in rating_layers(n_layers, None if layers is None else list(layers))]


def stage_counts(n_layers: int, stages: list[int], n_in: int, n_keep: int, version: str = "1.5",
                 **_: object) -> list[int]:
    reference_stages = len(next(iter(TABLES[_version(version)].values())))
    if len(stages) != reference_stages:
        raise UserError(f"sparsevlm: the schedule tables have {reference_stages} stages; layers gives {len(stages)}")
    return sparsevlm_counts(n_layers, stages, n_in, n_keep, _version(version))


def stage_extra(n_before: int, n_kept: int, version: str = "1.5", **_: object) -> int:
    """v1.5 inserts the recycled clusters after the kept tokens; v2.0 does not recycle."""
    return recycled_count(n_before, n_kept) if _version(version) == "1.5" else 0


@register_method(
    "sparsevlm",
    stage=Stage.INTRA_LLM,
    source="Zhang et al. 2025 §3.2-3.4 (v1.5) / SparseVLM+ §4.2-4.3 (v2.0); Gumpest/SparseVLMs branches v1.5, v2.0: "
    "llava/model/language_model/modelling_sparse_llama.py, score.py, utils.py",
    needs=("rater_attention", "raters", "rope_prior"),
    dtype="rater rows from layer l's q/k projections + RoPE in the model's dtype; q.k logits, softmax, v2.0 RoPE "
    "prior, head/rater means and raters' V.T softmax in float32; recycling in float32",
    rounding="keep read as the layer average round(keep*N): official table at N=576 and a tabled budget, else "
    "table fractions x a solved scale, floored, in [1, N]; v1.5 adds int((int(0.3*dropped)+1)/10)+1 clusters",
    positions=Positions.CONTIGUOUS,  # v1.5 truncates position_ids; v2.0 gathers the original ones
    positions_for=lambda version="1.5", **_: Positions.ORIGINAL if _version(version) == "2.0" else Positions.CONTIGUOUS,
    defaults={"version": "1.5", "layers": None},
    intra=IntraSchedule(layers=stage_layers, counts=stage_counts, extra=stage_extra),
    deviations=(
        "a budget below one token per stage from the first stage layer on is unreachable (32 layers, N=576: "
        "layer average >= 57.94): the installation flags it `budget unreachable`",
        "GQA: the raters' attention repeats each key head over its query group (repeat_kv, "
        "stages/attention.py); the official SparseVLM code has no repeat_kv and would fail on GQA models",
        "v1.5 recycling: the clusters are inserted after the last kept visual token (official: after the kept "
        "span of the single image) and count as visual tokens in the schedule and the layer average; their "
        "position is the next contiguous one (official), or, under original positions (M-RoPE families), the "
        "position of the token they follow; the tables' budgets do not include them (as in the official code)",
        "v1.5 recycling: DPC-kNN density noise (rand * 1e-6) drawn from the run's seeded generator; distances "
        "and merges in float32",
        "rating layers: the official [2, 6, 15] of 32 scaled as round(l*L/32) ([0, 1, 2] on a 4-layer model); "
        "pruning enters layer l+1 with layer l's rater rows (official: same layer, after its forward)",
        "budget: at N = 576 and a tabled budget (v1.5: 64/128/192; v2.0: 64/96/128/192) the official per-stage "
        "counts; otherwise the nearest table's fractions of 576, times one scale solved so the layer average "
        "(K_1*N + sum_s (K_{s+1}-K_s)*n_s)/L is closest to round(keep*N); counts clamped to [1, N], non-increasing",
        "layer average: counted over the layers each stage actually runs (rating layer l prunes for layers "
        "l+1..), e.g. the official 64 table gives (3*576 + 4*66 + 9*30 + 16*17)/32 = 79 at 32 layers, not the "
        "~62 of the official 2/4/10/16 comment",
        "a stage keeps min(k_l, surviving) tokens (official: min(k_l, surviving - 1), which drops one even when the "
        "schedule keeps all)",
        "raters: the text tokens after the last visual token of the prompt (official: after the single image); "
        "scores in float32; v2.0 head selection per batch row (official: batch row 0)",
        "v2.0 priority heads: min(14, H) heads (official 14 of LLaVA-7B's 32)",
        "dtype: the rater rows' q.k logits, softmax, v2.0 RoPE prior and head / rater means in float32 (q, k "
        "upcast after RoPE), the raters' V.T softmax too; official computes all of them in the model's dtype "
        "(v1.5: the flash_attn copy is .half(), fp16 matmul and torch.softmax; v2.0: utils.py "
        "scaled_dot_product_attention, no upcast), which can change the kept set under fp16/bf16",
    ),
)
def sparsevlm(ctx: SelectContext, version: str, layers: list[int] | None) -> torch.Tensor | Insertion:
    """signals: rater_attention [B, H, T, N], raters [B, T], rope_prior [B, T, N]; tokens [B, N, D] (the
    rating layer's output) -> [B, k] sorted, plus (v1.5) the recycled clusters to insert."""
    del layers  # consumed by the intra-LLM stage
    v2 = _version(version) == "2.0"
    s = ctx.signals
    scores = rater_scores(s["rater_attention"], s["raters"], s["rope_prior"] if v2 else None,
                          PRIORITY_HEADS if v2 else None)
    kept = top_k_sorted(scores, ctx.n_keep)
    if v2 or ctx.n_keep >= scores.shape[1]:
        return kept
    return Insertion(kept, recycle(ctx.tokens, scores, kept, ctx.generator))
