"""FasterVLM (Zhang et al. 2024, "[CLS] Attention is All You Need for Training-Free Visual Token
Pruning", arXiv 2412.01818 §3; official Theia-4869/FasterVLM `llava/model/llava_arch.py`
`encode_images`): rank the visual tokens by the head-mean attention the vision encoder's [CLS]
query pays them at the selected layer (CLIP `attentions[-2]`), keep the top k in their original
order; the projector runs on all tokens and the mask is applied after it (METHODS.md FasterVLM).
"""

from __future__ import annotations

import torch

from prunebench.methods.base import Positions, SelectContext, Stage, register_method, top_k_sorted
from prunebench.methods.cls_signal import CLS_DEVIATIONS


@register_method(
    "fastervlm",
    stage=Stage.PRE_LLM,
    source="arXiv 2412.01818 §3; Theia-4869/FasterVLM llava/model/llava_arch.py encode_images",
    needs=("cls_attention",),
    dtype="[CLS] row (no-[CLS] families: received attention) from the encoder layer's q/k in the model's dtype; "
    "q.k logits, softmax and head mean in float32 (stages/attention.py upcasts); top-k on the float32 row",
    rounding="round(keep*N) per image (n_keep_for, half up, >= 1)",
    positions=Positions.CONTIGUOUS,  # pruned in prepare_inputs_labels_for_multimodal: positions close up
    defaults={"vision_layer": None},
    deviations=(
        "budget: k = round(keep*N) per image (the official scripts' 144/58/29 are keep=0.25/0.1/0.05)",
        *CLS_DEVIATIONS,
    ),
)
def fastervlm(ctx: SelectContext, vision_layer: int | None = None) -> torch.Tensor:
    return top_k_sorted(ctx.signals["cls_attention"], ctx.n_keep)
