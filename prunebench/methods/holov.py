"""HoloV (NeurIPS 2025, holistic visual token pruning; official obananas/HoloV
`llava/model/utils.py` `HoloV`, called from `llava/model/llava_arch.py` on the post-projector
features with the CLIP layer -2 [CLS] attention): split the raster token sequence into P contiguous
1-D chunks, score each chunk by the mean of 1000*a + alpha*c*var (attention plus rescaled variance
of in-chunk cosine similarities), split the budget over chunks by score, keep the top tokens by
attention inside each chunk. See `cls_ops.holov_select` (METHODS.md HoloV).
"""

from __future__ import annotations

import torch

from prunebench.errors import UserError
from prunebench.methods.base import Positions, SelectContext, Stage, register_method
from prunebench.methods.cls_ops import holov_chunk_count, holov_select
from prunebench.methods.cls_signal import CLS_DEVIATIONS


@register_method(
    "holov",
    stage=Stage.PRE_LLM,
    source="HoloV (NeurIPS 2025); obananas/HoloV llava/model/utils.py HoloV, llava/model/llava_arch.py",
    needs=("cls_attention",),
    dtype="[CLS] row (no-[CLS] families: received attention) from the encoder layer's q/k in the model's dtype; "
    "q.k logits, softmax and head mean in float32 (stages/attention.py upcasts); chunk similarity variance and "
    "scores in float32",
    rounding="k = round(keep*N) per image (n_keep_for, half up, >= 1); chunk budgets floor(k*score_p/sum), "
    "remainder +1 to the top chunks",
    positions=Positions.CONTIGUOUS,  # tokens replaced in prepare_inputs_labels_for_multimodal: contiguous
    defaults={"alpha": 0.09, "vision_layer": None},
    deviations=(
        "chunks P = max(1, floor((1024/576) * N / k)) (about 1.78 N/k; 16 at N=576, k=64); the official LLaVA "
        "code hard-codes P=16 and k=64",
        "budget: k = round(keep*N) per image",
        "kept tokens in original raster order (official: chunk order, then descending attention within a chunk)",
        "exactly k real tokens: a budget shortfall (a chunk's budget beyond its size, or a remainder larger than "
        "the chunk count), which the official code pads with zero tokens, is filled with the highest-attention "
        "tokens not yet kept",
        "Qwen: the official HoloV-Qwen scores 1*attn instead of 1000*attn; the variance is rescaled to the "
        "attention's magnitude either way, so only chunks of one token (scored by their raw attention) differ",
        *CLS_DEVIATIONS,
    ),
)
def holov(ctx: SelectContext, alpha: float = 0.09, vision_layer: int | None = None) -> torch.Tensor:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise UserError(f"holov: alpha must be a number >= 0 (official 0.09), got {alpha!r}")
    n = ctx.tokens.shape[1]
    p = holov_chunk_count(n, ctx.n_keep)
    return torch.stack([holov_select(x, a, ctx.n_keep, p, float(alpha))
                        for x, a in zip(ctx.tokens, ctx.signals["cls_attention"], strict=True)])
