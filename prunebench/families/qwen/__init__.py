"""Qwen2.5-VL and Qwen2-VL adapter (`Qwen2_5_VLForConditionalGeneration`,
`Qwen2VLForConditionalGeneration`; transformers `models/qwen2_5_vl/modeling_qwen2_5_vl.py`).

Visual tokens are born in `model.model.visual`: the ViT runs in window order, the 2x2 patch
merger turns 4 patches into one LLM token, and the output `pooler_output` [sum_i N_i, D] is back
in raster order, N_i = t*h*w/4 for each image's `grid_thw` (dynamic resolution: every image has
its own count and budget; a video's budget is per temporal slice of h*w/4 tokens). That output is the pre-LLM seam. Positions are 3-D M-RoPE ids that
`generate` computes on the full sequence; pruning slices them and keeps the originals
(UniPruneBench does the same for Qwen), since a contiguous renumbering is undefined for M-RoPE.
Vision-stage merges (EvoPrune) run inside the ViT at 2x2 merge-unit granularity, consistent with
window attention and the full-attention blocks: `prunebench.families.qwen.vision.QwenVisionMerge` is
this family's vision driver (budget per image / temporal slice in merge units = LLM tokens; merged
units keep their representative's M-RoPE position). `merge_layer_class` stays None: the driver swaps
the ViT blocks itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunebench.families import Family, hf_class, lazy
from prunebench.seams import Seams, apply_rope

# how an image's resolution sets its visual tokens (the input stage, `method=downsample`)
INPUT_KNOB = lazy("prunebench.families.resolution:pixel_knob")

def _grid_thw(args: tuple, kwargs: dict) -> torch.Tensor:
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    if grid is None:
        raise RuntimeError("prunebench: the Qwen vision tower was called without grid_thw")
    return grid


def qwen_vl_seams(model: nn.Module) -> Seams:
    from prunebench.families.qwen.signals import QwenVisionSignals
    from prunebench.families.qwen.vision import QwenVisionMerge  # imports transformers' vision utils

    cfg = model.config
    visual = model.model.visual
    merge = visual.spatial_merge_size

    def split(args: tuple, kwargs: dict, output: object) -> list[torch.Tensor]:
        """One budget unit per image, and per temporal slice of a video (t slices of h*w/4 tokens)."""
        sizes = [h * w // merge**2 for t, h, w in _grid_thw(args, kwargs).tolist() for _ in range(t)]
        return list(output.pooler_output.split(sizes))

    def grids(args: tuple, kwargs: dict, tokens: list[torch.Tensor]) -> list[tuple[int, int] | None]:
        return [(h // merge, w // merge) for t, h, w in _grid_thw(args, kwargs).tolist() for _ in range(t)]

    return Seams(
        input_knob=INPUT_KNOB,
        family=cfg.model_type,
        multimodal=model.model,
        image_token_ids=(cfg.image_token_id, cfg.video_token_id),
        visual_output=visual,
        split_visual=split,
        visual_grids=grids,
        vision_tower=visual,
        vision_layers=list(visual.blocks),
        vision_grid=None,
        vision_prefix=0,
        merge_layer_class=None,
        language_model=model.model.language_model,
        decoder_layers=list(model.model.language_model.layers),
        apply_rope=apply_rope,
        mrope=True,
        vision_driver=QwenVisionMerge,
        vision_signals=QwenVisionSignals,
        visual_layout=lambda inputs: qwen_layout(inputs, merge),
    )


def qwen_layout(inputs: Any, merge: int) -> list[dict[str, Any]]:
    """Images, then videos (a prompt holds one kind here): one unit per image, one per temporal slice of a
    video, each of its grid_thw's h/merge x w/merge LLM tokens (the 2x2 merger's units)."""
    units: list[dict[str, Any]] = []
    for key, kind in (("image_grid_thw", "image"), ("video_grid_thw", "frame")):
        for i, (t, h, w) in enumerate(inputs[key].tolist() if key in inputs else []):
            for f in range(t):
                unit = {"kind": kind, "image": i, "grid": [h // merge, w // merge]}
                units.append({**unit, "frame": f} if kind == "frame" else unit)
    return units


_LOCAL = lazy("prunebench.fixtures.tiny_qwen:qwen_local_processor")
_LOAD = lazy("prunebench.families.processors:load_qwen_processor")  # torchvision-free (5.23 needs it otherwise)
FAMILY_ENTRIES = (
    Family("qwen2_5_vl", hf_class("Qwen2_5_VLForConditionalGeneration"), qwen_vl_seams, _LOCAL, _LOAD,
           tiny="prunebench.fixtures.tiny_qwen:build_tiny_qwen2_5_vl", tiny_image_side=112,
           input_knob=INPUT_KNOB),
    Family("qwen2_vl", hf_class("Qwen2VLForConditionalGeneration"), qwen_vl_seams, _LOCAL, _LOAD,
           tiny="prunebench.fixtures.tiny_qwen:build_tiny_qwen2_vl", tiny_image_side=112,
           input_knob=INPUT_KNOB),
)
