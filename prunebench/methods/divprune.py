"""DivPrune (Alvar et al., CVPR 2025 §3; official repo vbdi/divprune,
`LLaVA/llava/model/llava_arch.py` `DivPrune`): after the projector, keep the max-min diverse
subset of visual tokens under the cosine distance; see `divprune_ops.divprune_select`."""

from __future__ import annotations

import torch

from prunebench.methods.base import Positions, SelectContext, Stage, register_method
from prunebench.methods.divprune_ops import divprune_select


@register_method(
    "divprune",
    stage=Stage.PRE_LLM,
    source="Alvar et al. 2025 §3 (max-min diversity); vbdi/divprune LLaVA/llava/model/llava_arch.py DivPrune",
    dtype="cosine distance and max-min greedy in float32",
    rounding="round(keep*N) per image (n_keep_for, half up, >= 1)",
    positions=Positions.CONTIGUOUS,  # pruned in prepare_inputs_labels_for_multimodal: positions close up
    deviations=("budget: k = round(keep*N) per image (the official ratio 0.098 is keep=0.098)",),
)
def divprune(ctx: SelectContext) -> torch.Tensor:
    return divprune_select(ctx.tokens, ctx.n_keep)
