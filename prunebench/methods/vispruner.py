"""VisPruner ("Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
Token Pruning in VLMs", ICCV 2025, §3; official Theia-4869/VisPruner
`llava/model/llava_arch.py` `encode_images`): T_imp = int(T * r) important tokens by head-mean
[CLS] attention, then the rest are deduplicated by iterative bipartite matching on the cosine of
the vision features (before the projector) down to T - T_imp diverse tokens; the mask is applied
after the projector. See `cls_ops.vispruner_select` (METHODS.md VisPruner).
"""

from __future__ import annotations

import torch

from prunebench.checks import Kind
from prunebench.errors import UserError
from prunebench.methods.base import Positions, SelectContext, Stage, register_method
from prunebench.methods.cls_ops import vispruner_select
from prunebench.methods.cls_signal import CLS_DEVIATIONS
from prunebench.methods.tome_ops import SCORE_DTYPES


@register_method(
    "vispruner",
    stage=Stage.PRE_LLM,
    source="VisPruner (ICCV 2025) §3; Theia-4869/VisPruner llava/model/llava_arch.py encode_images",
    needs=("cls_attention", "vision_features"),
    dtype="duplication cosine in the vision features' (model's) dtype, score_dtype=fp32 upcasts (LLaVA-NeXT / "
    "OneVision: float32 always, their packed signals are float32); attention ranking in float32 (the [CLS] row)",
    rounding="T = round(keep*N) per image (n_keep_for, half up, >= 1); T_imp = int(T * important_ratio)",
    positions=Positions.CONTIGUOUS,  # pruned in prepare_inputs_labels_for_multimodal: positions close up
    defaults={"important_ratio": 0.5, "vision_layer": None, "score_dtype": "model"},
    kinds={"score_dtype": Kind("str", choices=SCORE_DTYPES)},
    deviations=(
        "score_dtype=fp32 (option; default `model`, the official arithmetic in the model's dtype) upcasts the "
        "duplication cosine to float32, which changes the kept set under fp16/bf16",
        "budget: T = round(keep*N) per image (the official visual_token_num is keep*576)",
        "the duplication cosines are read off one matrix of the residual tokens computed once, and each A token's "
        "best match in B off its 64 most similar tokens (sorted; the direct max over B where none is in B): the "
        "official code recomputes unit[A] @ unit[B].T every 8 removals, the same dot products and maxima; picks "
        "identical in tests/test_cls_merge_ops.py; 0.5x the cost of the N x N cosine matrix at 10,816 tokens "
        "(scripts/bench_selection.py), where the per-round gather cost 12x; above 16,384 residual tokens the "
        "official per-round GEMM",
        "ties in the attention ranking and the max-similarity ranking are broken by a stable sort (position "
        "order); the official argsort is unstable",
        "an odd number of residual tokens is split A = even positions (one more), B = odd; the official indexing "
        "assumes an even count",
        "InternVL / Qwen: duplication is measured on the projector's input per token (the 2x2 group's "
        "concatenated features)",
        *CLS_DEVIATIONS,
    ),
)
def vispruner(ctx: SelectContext, important_ratio: float = 0.5, vision_layer: int | None = None,
              score_dtype: str = "model") -> torch.Tensor:
    if isinstance(important_ratio, bool) or not isinstance(important_ratio, (int, float)) \
            or not 0.0 <= important_ratio < 1.0:
        raise UserError(f"vispruner: important_ratio must be a number in [0, 1) (e.g. 0.5, 0.75), got {important_ratio!r}")
    attention, features = ctx.signals["cls_attention"], ctx.signals["vision_features"]
    return torch.stack([vispruner_select(a, f, ctx.n_keep, float(important_ratio),
                                         score_dtype == "fp32")
                        for a, f in zip(attention, features, strict=True)])
