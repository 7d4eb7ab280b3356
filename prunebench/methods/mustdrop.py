"""MustDrop (Liu et al. 2024, "Multi-stage vision token dropping: towards efficient multimodal large
language model", §3.2-3.4; official repo liuting20/MustDrop): all three stages.

Vision encoder (§3.2; `llava/model/multimodal_encoder/clip_encoder.py` `CLIPVisionModelAcc.custom_forward`,
`local_merge.py` `conditional_pooling` / `merge_wavg`): after CLIP layer 0, each 3x3 window of the
24x24 patch grid whose mean off-diagonal cosine similarity is >= 0.8 becomes one token (size-weighted
mean); at the last CLIP layer (idx 23) the key set = the top ceil(0.08 * M) of the M patch tokens by
head-mean [CLS] attention. The math is in `mustdrop_ops.py`, the hooks in `stages/vision_mustdrop.py`.

Design: one intra-LLM method whose install also adds its vision handler (`vision_stage="mustdrop"`,
`stages.VISION_STAGES`), not a `compose` pipeline: the key set is not a pruning decision of its own
but state the LLM stages read, and the three stages share one hyper-parameter set and one record.
The merge bookkeeping is `VisionMerge`'s; by default (`token_order=merged_first`) the encoder and the
LLM see the official order [CLS, merged windows by score, unmerged in raster order], `token_order=raster`
puts each token at its representative's raster slot. The key set reaches the LLM entry as a bool per
surviving visual token and is carried through every LLM stage as protected rows (`key_set` signal).

LLM stages (`llava/model/language_model/modelling_sparse_llama.py`: `LlamaDynamicvitModel.forward`,
`dual_attention_filter`, and the "Sparse kv cache (decoding stage)").

Prefill: after each of the layers l in [2, 6, 10, 14] (of 32), the head-mean attention of every text
token after the image to each visual token, a_tj, is read from layer l; visual token j is dropped when
both its global score sum_t a_tj < g * sum_j' sum_t a_tj' and its individual score max_t a_tj < i
(dual-attention filtering) unless it is in the key set (official: `torch.unique(cat(kept, key_set))`);
the rest stay in order and positions are truncated to contiguous.
Here the rows are recomputed from layer l's captured q/k (only the text rows) and the drop enters
layer l + 1. Decoding: the KV caches of layers l_1 .. l_S keep only the final visual set, so every
decode step from layer l_1 on attends to it.
"""

from __future__ import annotations

import math

import torch

from prunebench.checks import Kind
from prunebench.errors import UserError
from prunebench.methods.base import IntraSchedule, Positions, SelectContext, Stage, register_method
from prunebench.methods.mustdrop_ops import TOKEN_ORDERS

PAPER_LAYERS = 32
PAPER_RATING_LAYERS = (2, 6, 10, 14)  # self.pruning_layers
REFERENCE_N = 576
# README / scripts/v1_5/eval/textvqa_{192,128,64}.sh: budget -> (global_thr, individual_thr)
THRESHOLDS: dict[int, tuple[float, float]] = {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}


def stage_layers(n_layers: int, layers: list[int] | None = None, **_: object) -> list[int]:
    """Prune entering l + 1 for each rating layer l: given, or [2, 6, 10, 14] of 32 scaled as
    round-half-up(l * L / 32) with repeats removed ([0, 1, 2] on a 4-layer model)."""
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not all(isinstance(k, int) for k in layers):
            raise UserError(f"mustdrop: layers must be null or a list of rating-layer indices, got {layers!r}")
        return [k + 1 for k in layers]
    scaled = [math.floor(k * n_layers / PAPER_LAYERS + 0.5) for k in PAPER_RATING_LAYERS]
    return [k + 1 for k in dict.fromkeys(scaled)]


def thresholds_for(keep: float, global_thr: float | None, individual_thr: float | None) -> tuple[float, float]:
    """(g, i): the ones given, else the official pair of the budget nearest keep * 576; keep = 1 drops nothing."""
    if keep >= 1.0:
        return 0.0, 0.0
    budget = min(THRESHOLDS, key=lambda b: (abs(b - keep * REFERENCE_N), b))
    g, i = THRESHOLDS[budget]
    g, i = (g if global_thr is None else global_thr), (i if individual_thr is None else individual_thr)
    if not (0.0 <= g <= 1.0 and 0.0 <= i <= 1.0):
        raise UserError(f"mustdrop: global_thr and individual_thr must be null or in [0, 1], got {g}, {i}")
    return g, i


def vision_stage_on(keep: float, vision_stages: bool, merge_thr: float, window: int, key_ratio: float,
                    token_order: str = "merged_first", **_: object) -> bool:
    """Check the vision-stage hyper-parameters; the stages act when keep < 1 and vision_stages is on."""
    if not isinstance(vision_stages, bool):
        raise UserError(f"mustdrop: vision_stages must be true or false, got {vision_stages!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise UserError(f"mustdrop: window must be an integer >= 2 (official 3), got {window!r}")
    if not isinstance(merge_thr, (int, float)) or not -1.0 <= merge_thr <= 1.0:
        raise UserError(f"mustdrop: merge_thr must be a cosine in [-1, 1] (official 0.8), got {merge_thr!r}")
    if not isinstance(key_ratio, (int, float)) or not 0.0 <= key_ratio <= 1.0:
        raise UserError(f"mustdrop: key_ratio must be in [0, 1] (official 0.08), got {key_ratio!r}")
    return vision_stages and keep < 1.0


def dual_attention_keep(attention: torch.Tensor, global_thr: float, individual_thr: float) -> torch.Tensor:
    """attention [B, T, N] (head-mean rows of the text tokens, visual columns) -> [B, N] bool kept.

    Dropped: sum_t a_tj < global_thr * sum_j sum_t a_tj AND max_t a_tj < individual_thr. At least the
    token of largest global score is kept (our n_keep >= 1 convention)."""
    total = attention.sum(dim=1)  # [B, N] global attention
    dropped = (total < total.sum(dim=-1, keepdim=True) * global_thr) & (attention.amax(dim=1) < individual_thr)
    keep = ~dropped
    keep.scatter_(1, total.argmax(dim=-1, keepdim=True), True)
    return keep


@register_method(
    "mustdrop",
    stage=Stage.INTRA_LLM,
    source="Liu et al. 2024 §3.3-3.4 (MustDrop prefill + decoding stages); liuting20/MustDrop "
    "llava/model/language_model/modelling_sparse_llama.py (pruning_layers [2, 6, 10, 14], dual_attention_filter, "
    "decoding-stage KV selection); thresholds from README / scripts/v1_5/eval/textvqa_*.sh",
    needs=("rater_attention", "key_set"),
    dtype="text rows from layer l's q/k + RoPE in the model's dtype, logits, softmax and head mean in float32; "
    "window cosine, key-set [CLS] row and merge in float32",
    rounding="no token count: thresholds (the official pair of the budget nearest keep*576, or given) decide "
    "each stage's count (adaptive, >= 1 per stage)",
    positions=Positions.CONTIGUOUS,
    defaults={"layers": None, "global_thr": None, "individual_thr": None, "vision_stages": True,
              "merge_thr": 0.8, "window": 3, "key_ratio": 0.08, "token_order": "merged_first"},
    kinds={"token_order": Kind("str", choices=TOKEN_ORDERS)},
    intra=IntraSchedule(layers=stage_layers, counts=None, final_cache=True),
    vision_stage="mustdrop",
    vision_stage_on=vision_stage_on,
    deviations=(
        "vision stages on LLaVA-1.5 only (one fixed CLIP grid behind [CLS]); other families refuse them at install "
        "and run the LLM stages with vision_stages=false (then nothing is protected)",
        "window merge: token_order=merged_first (default) keeps the official order [CLS, merged windows by "
        "descending score (ties to the earlier window), unmerged patches in raster order] in the encoder and in the "
        "LLM's image block; token_order=raster (this harness's former order) puts every token at its raster slot "
        "(merged ones at their bottom-right member, the official dst), which changes about half of the final kept "
        "set at keep 0.111; the size-weighted mean is computed in float32",
        "token_order=merged_first with positions=original: the image block's slots keep the original positions of "
        "the sorted survivors, the tokens fill them in the official order (the official code has contiguous ids)",
        "key set: head-mean [CLS] row of the last CLIP layer recomputed from its own q/k under SDPA (official: "
        "eager attentions); top-k ties go to the earlier token; ceil(key_ratio * M), M = patch tokens after the merge",
        "keep = 1.0 runs none of the stages (official: the vision stages always run); keep < 1 runs the vision "
        "stages at the official fixed thresholds (merge_thr 0.8, 3x3, key_ratio 0.08): the tokens entering the LLM "
        "are adaptive, the record's layer_avg and llm_schedule start from them",
        "batch (as official `.min()`): the number of merged windows is the batch minimum, each image its top windows",
        "record: n_visual_in = the prompt's patch tokens, n_visual_out = the final LLM set; the merged count entering "
        "the LLM shows as llm_prompt_len and as the layer average's value before the first rating layer",
        "compose: with its vision stages on, mustdrop must be the pipeline's only stage (vision_stages=false otherwise)",
        "budget: adaptive (as official); keep selects the official threshold pair of the nearest budget "
        "(64/128/192 of 576: (0.011, 0.01) / (0.0012, 0.001) / (0.001, 0.001)) unless global_thr / individual_thr "
        "are given; keep = 1.0 drops nothing; the record's llm_schedule / layer_avg state what was kept",
        "rating layers [2, 6, 10, 14] of 32 scaled as round(l*L/32) with repeats removed; the drop enters layer "
        "l+1 with layer l's text rows recomputed from its q/k (official: the same layer's eager attention)",
        "at least one visual token is kept per stage (the official filter may drop all)",
        "text rows: every token after the last visual token (official: after the single image)",
    ),
)
def mustdrop(ctx: SelectContext, layers: list[int] | None, global_thr: float | None,
             individual_thr: float | None, **vision: object) -> torch.Tensor:
    """signals['rater_attention']: [B, H, T, N], signals['key_set']: [B, N] bool -> [B, k] kept indices,
    sorted (k adaptive, equal across B); key-set tokens are always kept."""
    del layers, vision  # consumed by the intra-LLM and vision stages
    g, i = thresholds_for(ctx.keep, global_thr, individual_thr)
    keep = dual_attention_keep(ctx.signals["rater_attention"].float().mean(dim=1), g, i)
    if "key_set" in ctx.signals:
        keep |= ctx.signals["key_set"].to(keep.device)
    counts = keep.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise RuntimeError("mustdrop kept different counts across the batch; run with batch_size=1")
    return keep.nonzero()[:, 1].view(keep.shape[0], -1)
