"""InternVL3 adapter (`InternVLForConditionalGeneration`, transformers `models/internvl/modeling_internvl.py`).

Each 448 px tile is encoded by InternViT ([CLS] dropped), pixel-shuffled 2x2 and projected; the
projector output [tiles, 256, D] is the pre-LLM seam. The processor does not tell the model
which tiles belong to which image, so budgets are per tile (as UniPruneBench pools each tile).
Vision-stage merges run on tiles at whole pixel-shuffle-group granularity (`vision.py`, this room).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from prunebench.families import Family, hf_class, lazy
from prunebench.seams import Seams, apply_rope

# how an image's resolution sets its visual tokens (the input stage, `method=downsample`)
INPUT_KNOB = lazy("prunebench.families.resolution:tile_knob")

def _per_row(args: tuple, kwargs: dict, output: torch.Tensor) -> list[torch.Tensor]:
    return list(output)


def _square_grids(args: tuple, kwargs: dict, tokens: list[torch.Tensor]) -> list[tuple[int, int] | None]:
    sides = [math.isqrt(t.shape[0]) for t in tokens]
    return [(s, s) if s * s == t.shape[0] else None for s, t in zip(sides, tokens, strict=True)]


def internvl_seams(model: nn.Module) -> Seams:
    from prunebench.families.internvl.vision import InternVLVisionMerge, shuffle_groups

    cfg, inner = model.config, model.model
    return Seams(
        input_knob=INPUT_KNOB,
        family="internvl",
        multimodal=inner,
        image_token_ids=(cfg.image_token_id,),
        visual_output=inner.multi_modal_projector,
        split_visual=_per_row,
        visual_grids=_square_grids,
        vision_tower=inner.vision_tower,
        vision_layers=list(inner.vision_tower.encoder.layer),
        vision_grid=None,
        vision_prefix=1,
        merge_layer_class=None,
        language_model=inner.language_model,
        decoder_layers=list(inner.language_model.layers),
        apply_rope=apply_rope,
        vision_driver=InternVLVisionMerge,
        signal_groups=lambda side: shuffle_groups(inner, side),
        projector_rows=True,
        visual_layout=lambda inputs: internvl_layout(inputs, cfg),
    )


def internvl_layout(inputs: Any, cfg: Any) -> list[dict[str, Any]]:
    """One unit per tile, (image_size / patch / 2)^2 tokens after the 2x2 pixel shuffle. The processor does not
    say which tiles form an image: a reader takes a row's tiles as one image's, the last one its thumbnail when
    there are several (the processor's order: crops in raster order, then the thumbnail)."""
    vision = cfg.vision_config
    size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    side = int(size // patch * cfg.downsample_ratio)
    return [{"kind": "tile", "image": 0, "tile": j, "grid": [side, side], "tile_px": int(size)}
            for j in range(inputs["pixel_values"].shape[0])]


_LOCAL = lazy("prunebench.fixtures.tiny_families:family_local_processor")
_LOAD = lazy("prunebench.families.processors:load_processor")  # torchvision-free (5.23 needs it otherwise)

FAMILY_ENTRIES = (
    Family("internvl", hf_class("InternVLForConditionalGeneration"), internvl_seams, _LOCAL, _LOAD,
           tiny="prunebench.fixtures.tiny_families:build_tiny_internvl", tiny_image_side=64,
           input_knob=INPUT_KNOB, input_per_call=True),
)
