"""ToMe, Token Merging (Bolya et al., ICLR 2023, arXiv 2210.09461, §3; facebookresearch/ToMe
`tome/merge.py` `bipartite_soft_matching` + `merge_wavg`, `tome/patch/timm.py` ToMeBlock/ToMeAttention).

In each encoder layer, between self-attention and the MLP, r_l tokens are merged: metric = that
layer's keys averaged over heads; bipartite split by parity (a = even, b = odd); each a picks its
most similar b by cosine; the r_l a's with the highest similarity merge into their b's by
size-weighted mean; [CLS] never merges. r_l comes from `merge_ops.layer_schedule` (default
`mean` = ToMe's constant r, sum r_l = N - n_keep, each layer capped at half its tokens).
Proportional attention (log size added to the attention logits of later layers) runs through the
encoder layer's own attention mask (SDPA stays on). The math is in `tome_ops.py`; the hooks are in
`stages/vision.py` (CLIP/SigLIP), `families/qwen/vision.py`, `families/internvl/vision.py`.
"""

from __future__ import annotations

from prunebench.checks import Kind
from prunebench.methods.base import METHODS, MethodSpec, Positions, Stage
from prunebench.methods.merge_ops import MERGE_POINTS, layer_schedule
from prunebench.methods.tome_ops import SCORE_DTYPES, tome_merge

METHODS.add(
    "tome",
    MethodSpec(
        name="tome",
        stage=Stage.VISION,
        source="ToMe arXiv 2210.09461 §3; facebookresearch/ToMe tome/merge.py (bipartite_soft_matching, "
        "merge_wavg), tome/patch/timm.py (ToMeBlock, ToMeAttention)",
        schedule=layer_schedule,
        merge=tome_merge,
        needs=frozenset({"keys"}),
        dtype="matching similarity in the metric's (model's) dtype, score_dtype=fp32 upcasts; size-weighted mean "
        "in float32",
        rounding="sum of r_l = N - round(keep*N) (n_keep_for, half up); per-layer r_l by largest remainder",
        positions=Positions.CONTIGUOUS,  # merged tokens enter the LLM as a shorter image run
        defaults={"schedule": "mean", "prop_attn": True, "merge_point": "attention", "score_dtype": "model"},
        kinds={"score_dtype": Kind("str", choices=SCORE_DTYPES), "merge_point": Kind("str", choices=MERGE_POINTS)},
        deviations=(
            "budget: sum of r_l = N - round(keep*N) exactly, by the `mean` schedule (largest-remainder "
            "integers, excess over a layer's 50% cap moved to an earlier layer); ToMe uses one constant r",
            "schedule runs over the encoder layers that feed the selected features (LLaVA-1.5: 23 of 24 CLIP layers)",
            "survivors stay in sequence order (sorted by their representative's original index) instead of "
            "ToMe's [unmerged a, b] concatenation, so the parity split of later layers differs; ties in the "
            "similarity ranking go to the earlier a-token (stable sort)",
            "matching similarity in the metric's dtype (the model's, as official tome/merge.py); score_dtype=fp32 "
            "(option) upcasts it to float32 (our former default), which changes merges under fp16/bf16",
            "size-weighted mean computed in float32, untouched tokens keep their exact values",
            "proportional attention (default on) on CLIP/SigLIP families (llava, llava_next, llava_onevision) via "
            "the encoder layer's additive attention mask; NOT applied on Qwen2.5-VL/Qwen2-VL (varlen window "
            "attention, no mask argument) and InternVL (InternViT layers take no mask): an install note says so",
            "Qwen2.5-VL/Qwen2-VL: merges whole 2x2 merge units; unit metric = mean over its 4 rows of the "
            "head-mean keys before the vision rotary embedding; budget and schedule per image / video slice "
            "over all ViT blocks (families/qwen/vision.py)",
            "InternVL3: merges whole pixel-shuffle groups (unit metric = mean of its 4 rows' head-mean "
            "post-qk-norm keys) inside InternViT, per tile; LLaVA-NeXT: per view, round(keep*576); "
            "LLaVA-OneVision videos: per frame, merges replace HF's bilinear pooling (as EvoPrune)",
        ),
    ),
)
