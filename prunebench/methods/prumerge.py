"""LLaVA-PruMerge and PruMerge+ (Shang et al. 2024 §3.1-3.3; official 42Shawn/LLaVA-PruMerge
`llava/model/multimodal_encoder/clip_encoder.py` `token_prune_merge_advanced` (PruMerge) and
`token_prune_merge_advanced_plus` (PruMerge+)), fixed-budget mode (default) or the paper's
adaptive mode (`adaptive: true`: the per-image count is the IQR outlier count, keep is ignored).

Per image, from the LAST CLIP layer's q/k (official hooks on `layers[23].self_attn.{q,k}_proj`,
one head over the full width, scale width^-1/2) and the selected features (CLIP layer -2, [CLS] dropped):
1. keep k patches: PruMerge the top-k by [CLS] attention (official `if_adaptive=False`);
   PruMerge+ the top min(IQR outliers, k) filled to k with patches spread uniformly over the rest
   (EffiVLM-Bench's fixed-budget reading, METHODS.md);
2. each kept patch i <- x_i + sum of a_j x_j over its 32 most key-similar other tokens (kept or
   pruned), a_j the unnormalised [CLS] attention (the official per-token Python loop, vectorised);
3. one extra token sum_{pruned} a_j x_j: k + 1 tokens reach the LLM (`MethodSpec.budget`).
keep=1.0 keeps every patch untouched (no merge, no extra token), in both modes.
Adaptive (`adaptive: true`, official `if_adaptive=True`, the paper's §3.2): any keep < 1 switches
pruning on and is otherwise ignored; per image c = max(1, IQR outliers of the [CLS] row) patches
(PruMerge+: those plus the official spatial grid), then steps 2-3; the record counts what was kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from prunebench.errors import UserError
from prunebench.methods.base import Positions, SelectContext, Selection, Stage, register_method
from prunebench.methods.cls_signal import CLS_DEVIATIONS
from prunebench.methods.prumerge_ops import (
    N_NEIGHBOURS,
    adaptive_count,
    extra_slot,
    prumerge_merge,
    prumerge_plus_adaptive_select,
    prumerge_plus_select,
    prumerge_select,
)

NEEDS = ("cls_attention_full", "cls_keys_full", "projector_input")
DEFAULTS = {"n_neighbours": N_NEIGHBOURS, "vision_layer": -1, "adaptive": False}
ADAPTIVE_DEVIATIONS = (
    "adaptive: keep=1.0 is the unpruned model (no merge, no aggregate token); any keep < 1 runs the adaptive "
    "count and keep's value is ignored (the record states the counts: n_visual_out is what was kept)",
    "adaptive: the count is the number of IQR outliers (official int(N * outliers / N), the same up to float "
    "rounding), at least 1 (the official code would keep none and pass the aggregate token only); percentiles "
    "per image (official: over the flattened batch, the same for one image)",
    "adaptive on LLaVA-NeXT / OneVision: the IQR count runs over the packed image's candidates (base + crops), "
    "per frame for videos (official LLaVA-1.5 only: one 576-patch view)",
)
DEVIATIONS = (
    "k = round-half-up(keep * N) (n_keep_for, as every method here); the official fixed mode keeps "
    "int(N * reduction_ratio) (floor)",
    "the [CLS] row is recomputed from the captured q/k in float32 (official: the model dtype)",
    "budget: the k + 1 tokens the LLM receives are the k kept patches plus the aggregate token; the aggregate "
    "token occupies the placeholder slot of the last pruned patch (the official code appends it after the kept "
    "tokens; with contiguous positions this is the same place whenever the last patch is pruned)",
    "token order: kept patches in raster order (official: descending [CLS] attention, then the grid patches of "
    "PruMerge+, then the aggregate token)",
    "the merge's neighbour search is vectorised (one [k, N] cosine matrix, self excluded) instead of the "
    "official per-token loop; ties among equal cosines may pick different neighbours",
    "families whose projector input is not row-aligned with its output (Qwen2/2.5-VL merger; LLaVA-NeXT / "
    "OneVision, whose projector runs per view before unpadding and packing) merge after the projector, in LLM "
    "space, on the packed tokens (noted in the record); on Qwen / OneVision the attention is the head-mean received-attention "
    "substitute and the keys the head-mean keys per unit (no single-head reading)",
    "InternVL: merged on the pixel-shuffled projector input (a token = a 2x2 group's concatenated features); "
    "vision_layer=-1 is also InternVL's selected layer",
) + tuple(  # the shared ones that apply: PruMerge itself already reads hooked q/k, at layer -1
    d for d in CLS_DEVIATIONS if d.startswith(("InternVL", "Qwen", "LLaVA-NeXT"))
)


def _budget(n_in: int, n_keep: int, adaptive: bool = False, **params: object) -> int:
    """k kept patches + 1 aggregate token; keep=1.0 (k = n_in) adds nothing. Adaptive: the count is
    data-dependent (the record states it); n_in is its upper bound."""
    return n_in if n_keep >= n_in or adaptive else n_keep + 1


def _run(select: Callable[[torch.Tensor, int], torch.Tensor], adaptive_select: Callable[[torch.Tensor], torch.Tensor],
         ctx: SelectContext, n_neighbours: int, adaptive: bool) -> torch.Tensor | Selection:
    if not isinstance(n_neighbours, int) or isinstance(n_neighbours, bool) or n_neighbours < 1:
        raise UserError(f"prumerge: n_neighbours must be a positive integer (official 32), got {n_neighbours!r}")
    if not isinstance(adaptive, bool):
        raise UserError(f"prumerge: adaptive must be true (IQR outlier count) or false (fixed budget), got {adaptive!r}")
    x, n = ctx.tokens, ctx.tokens.shape[1]
    if ctx.n_keep >= n:  # keep=1.0: the unpruned model (adaptive too)
        return torch.arange(n, device=x.device)[None]
    attn, keys = ctx.signals["cls_attention_full"], ctx.signals["cls_keys_full"]
    kept = adaptive_select(attn) if adaptive else select(attn, ctx.n_keep)
    if kept.shape[1] >= n:  # adaptive on a tiny view: nothing left to prune
        return torch.arange(n, device=x.device)[None]
    merged, extra = prumerge_merge(x, attn, keys, kept, n_neighbours)
    index = torch.cat([kept, extra_slot(kept, n)[:, None]], dim=1)
    order = index.argsort(dim=1)
    tokens = torch.cat([merged, extra[:, None]], dim=1).gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    return Selection(index=index.gather(1, order), tokens=tokens)


@register_method(
    "prumerge",
    stage=Stage.PRE_LLM,
    source="Shang et al. 2024 §3; 42Shawn/LLaVA-PruMerge clip_encoder.py token_prune_merge_advanced",
    needs=NEEDS,
    dtype="full-width [CLS] row from q/k in the model's dtype, logits and softmax in float32; key cosine and "
    "merge in float32 (cast back to the model's dtype)",
    cost="the merge gathers the full features of the 32 nearest neighbours of each kept token (k*32*D values, "
    "memory-bound): at 576 tokens 1.9-2.1x the (small) N x N cosine matrix; 0.5x of it at 2,880 and 0.15x at "
    "10,816 (scripts/bench_selection.py, one CPU thread)",
    rounding="k = round(keep*N) per image (n_keep_for, half up, >= 1) patches + 1 aggregate token; "
    "adaptive=true: the IQR outlier count (>= 1), keep ignored",
    positions=Positions.CONTIGUOUS,  # official: rebuilt sequence in prepare_inputs_labels_for_multimodal
    defaults=DEFAULTS,
    deviations=("fixed budget (official if_adaptive=False, reduction_ratio = keep): the top-k patches by [CLS] "
                "attention; adaptive=true: the paper's IQR outlier count",) + DEVIATIONS + ADAPTIVE_DEVIATIONS,
    budget=_budget,
)
def prumerge(ctx: SelectContext, n_neighbours: int = N_NEIGHBOURS, vision_layer: int = -1, adaptive: bool = False
             ) -> torch.Tensor | Selection:
    """[1, N, D] + cls_attention_full [1, N] + cls_keys_full [1, N, d] -> Selection of k + 1 tokens
    (adaptive: k = the IQR outlier count)."""
    return _run(prumerge_select, lambda attn: prumerge_select(attn, adaptive_count(attn)), ctx, n_neighbours,
                adaptive)


@register_method(
    "prumerge_plus",
    stage=Stage.PRE_LLM,
    source="Shang et al. 2024 §3.3 (PruMerge+); 42Shawn/LLaVA-PruMerge clip_encoder.py "
    "token_prune_merge_advanced_plus; fixed budget as EffiVLM-Bench (METHODS.md)",
    needs=NEEDS,
    dtype="full-width [CLS] row from q/k in the model's dtype, logits and softmax in float32; IQR, key cosine "
    "and merge in float32 (cast back to the model's dtype)",
    cost="the merge gathers the full features of the 32 nearest neighbours of each kept token (k*32*D values, "
    "memory-bound): at 576 tokens 1.9-2.1x the (small) N x N cosine matrix; 0.5x of it at 2,880 and 0.15x at "
    "10,816 (scripts/bench_selection.py, one CPU thread)",
    rounding="k = round(keep*N) per image (n_keep_for, half up, >= 1) patches (top min(IQR outliers, k), "
    "uniform fill) + 1 aggregate token; adaptive=true: outliers + grid, keep ignored",
    positions=Positions.CONTIGUOUS,
    defaults=DEFAULTS,
    deviations=("fixed budget (EffiVLM-Bench's reading): the top min(IQR outliers, k) patches by [CLS] attention, "
                "filled to k with the free patches at positions floor((j + 1/2) F / m) of the F free patches in "
                "raster order; the official adaptive branch adds arange(0, 575, int(1/ratio) // 3) (about 4x the "
                "outliers), its training branch top-k + arange(step/2, 575, step) with duplicates; adaptive=true: "
                "the official adaptive branch, outliers + arange(0, N - 1, (N // c) // 3) not already kept",)
    + DEVIATIONS + ADAPTIVE_DEVIATIONS,
    budget=_budget,
)
def prumerge_plus(ctx: SelectContext, n_neighbours: int = N_NEIGHBOURS, vision_layer: int = -1,
                  adaptive: bool = False) -> torch.Tensor | Selection:
    """As `prumerge`, with PruMerge+'s outliers + uniform spatial fill as the kept set."""
    return _run(prumerge_plus_select, prumerge_plus_adaptive_select, ctx, n_neighbours, adaptive)
