"""What a family adapter provides: where each stage sits in one model family (its seams)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Seams:
    """Module handles of one loaded model, as the stage hooks need them.

    multimodal: the module whose forward receives `input_ids` and scatters visual tokens
        (LLaVA: `model.model`); its pre-hook finds the image-token positions.
    vision_tower / vision_layers: the encoder and the layers that feed the selected features
        (LLaVA-1.5 selects layer -2, so the last CLIP layer is not among them).
    vision_prefix: tokens ahead of the patches in the encoder sequence (CLIP's [CLS]: 1).
    merge_layer_class: per-instance class swap that calls `self._pb_merge(x)` between the
        encoder layer's attention and MLP (ToMe `tome/patch/timm.py` style).
    projector: output [n_images, N, D] visual tokens in LLM space (the pre-LLM seam).
    language_model / decoder_layers: the LLM stack (entry compaction, intra-LLM seam).
    apply_rope: (x [B, h, T, d], cos [B, T, d], sin) -> x, the family's rotary embedding.
    """

    multimodal: nn.Module
    vision_tower: nn.Module
    vision_layers: list[nn.Module]
    vision_prefix: int
    merge_layer_class: type[nn.Module]
    projector: nn.Module
    language_model: nn.Module
    decoder_layers: list[nn.Module]
    image_token_id: int
    grid: tuple[int, int]
    apply_rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    @property
    def n_visual(self) -> int:
        return self.grid[0] * self.grid[1]
