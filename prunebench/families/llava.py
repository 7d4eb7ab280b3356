"""LLaVA-1.5 adapter (`LlavaForConditionalGeneration`, transformers `models/llava/modeling_llava.py`).

Seams: CLIP encoder layers (vision stage, class swap between attention and MLP), the
multi-modal projector (pre-LLM), the Llama decoder (LLM entry and layer K).
`get_image_features` is where visual tokens are born; the LLM sees them only after the
projector hook and the LLM-entry hook have applied the method's decision.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunebench.families import Family, hf_class
from prunebench.seams import Seams, apply_rope, merging_subclass


def _merging_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     **kwargs) -> torch.Tensor:
    """`CLIPEncoderLayer.forward` / `SiglipEncoderLayer.forward` (transformers 5.23, identical) line
    for line, plus `self._pb_merge`, set per instance by the vision stage (EvoPrune Alg. 1, line 8)."""
    residual = hidden_states
    hidden_states = self.layer_norm1(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
    hidden_states = residual + hidden_states
    hidden_states = self._pb_merge(hidden_states)
    residual = hidden_states
    hidden_states = self.layer_norm2(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states


def merging_layer_class(base: type[nn.Module]) -> type[nn.Module]:
    """CLIP/SigLIP encoder layer class with the merge step between attention and MLP."""
    return merging_subclass(base, _merging_forward)


def feeding_layers(n_layers: int, feature_layer: int) -> int:
    """How many encoder layers run before the selected hidden state (hidden_states[0] = embeddings)."""
    return feature_layer if feature_layer >= 0 else n_layers + 1 + feature_layer


def _per_image(args: tuple, kwargs: dict, output: torch.Tensor) -> list[torch.Tensor]:
    """Projector output [n_images, N, D] -> one [N, D] tensor per image."""
    return list(output)


def llava_seams(model: nn.Module) -> Seams:
    cfg = model.config
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError("prunebench supports a single vision_feature_layer for LLaVA")
    if cfg.vision_feature_select_strategy != "default":
        raise ValueError("prunebench expects vision_feature_select_strategy='default' (CLS dropped)")
    vision = model.model.vision_tower
    layers = list(vision.encoder.layers)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return Seams(
        family="llava",
        multimodal=model.model,
        image_token_ids=(cfg.image_token_id,),
        visual_output=model.model.multi_modal_projector,
        split_visual=_per_image,
        visual_grids=lambda args, kwargs, tokens: [(side, side)] * len(tokens),
        vision_tower=vision,
        vision_layers=layers[: feeding_layers(len(layers), cfg.vision_feature_layer)],
        vision_grid=(side, side),
        vision_prefix=1,
        merge_layer_class=merging_layer_class(type(layers[0])),
        language_model=model.model.language_model,
        decoder_layers=list(model.model.language_model.layers),
        apply_rope=apply_rope,
        projector_rows=True,
        visual_layout=lambda inputs: [{"kind": "image", "image": i, "grid": [side, side]}
                                      for i in range(inputs["pixel_values"].shape[0])],
    )


def _local_processor(config: Any) -> tuple[Any, dict[str, Any]]:
    from prunebench.fixtures.tiny import build_processor

    processor = build_processor(config.vision_config.image_size, config.vision_config.patch_size)
    return processor, {"image_token_id": processor.tokenizer.convert_tokens_to_ids("<image>")}


FAMILY_ENTRIES = (
    Family("llava", hf_class("LlavaForConditionalGeneration"), llava_seams, _local_processor,
           tiny="prunebench.fixtures.tiny:build_tiny_llava", tiny_image_side=48),
)
