"""How a family's processor turns an image's resolution into visual tokens: one integer knob per image, for the
input stage (`method=downsample`, `prunebench.stages.inputs`).

A `Knob` is the processor's own arithmetic (transformers 5.23), read without processing any pixels:
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL (`pixel_knob`): the image's long side in pixels (aspect ratio kept); the image
  processor's `smart_resize` within its min/max pixel bounds, then the 2x2 merge (`get_number_of_image_patches`);
- LLaVA-NeXT / OneVision / LLaVA-Video (`anyres_knob`): the long side again; the any-resolution grid the processor
  selects for that size (`select_best_resolution`), unpadded, plus the fixed base image and the row newlines
  (`_get_num_multimodal_tokens`);
- InternVL (`tile_knob`): the most tiles the processor may cut (`max_patches`, the image untouched); 448-px tiles
  plus the thumbnail, `image_seq_length` tokens each (`get_number_of_image_patches`).
Every count rises (not strictly) with its setting; `high` is the image as given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Knob:
    """One image's resolution setting: `tokens(s)` visual tokens at setting s in [low, high]; `high` = unchanged."""

    what: str  # what the setting is, for messages: "long side (px)", "max tiles"
    low: int
    high: int
    tokens: Callable[[int], int]
    # the setting applied: (the image to process, processor call kwargs)
    apply: Callable[[int, str], tuple[Image.Image, dict[str, Any]]]


RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
              "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


def scaled_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) with the long side set to `long_side`, the short side scaled to match (round half up, at
    least 1 px): the aspect ratio kept to within a pixel."""
    long, short = max(width, height), min(width, height)
    other = max(1, int(short * long_side / long + 0.5))
    return (long_side, other) if width >= height else (other, long_side)


def _long_side_knob(image: Image.Image, count: Callable[[int, int], int], min_area: int = 1) -> Knob:
    """A knob on the long side, from the smallest that keeps the short side >= 1 px and the area >= min_area (a
    processor upsamples smaller images back to its minimum) to the image's own.
    count(height, width) -> visual tokens of an image that size."""
    width, height = image.size
    long, short = max(width, height), min(width, height)
    low = max(-(-long // short), math.ceil(long * math.sqrt(min_area / (width * height))))

    def tokens(side: int) -> int:
        w, h = scaled_size(width, height, side)
        return count(h, w)

    def apply(side: int, resample: str) -> tuple[Image.Image, dict[str, Any]]:
        if side == long:
            return image, {}
        return image.resize(scaled_size(width, height, side), RESAMPLING[resample]), {}

    return Knob("long side (px)", min(low, long), long, tokens, apply)


def pixel_knob(processor: Any, image: Image.Image) -> Knob:
    """Qwen-VL: tokens = merged grid of the smart-resized image (pixel bounds of the image processor); never
    below its min_pixels, which `smart_resize` would scale back up."""
    ip = processor.image_processor
    merge = ip.merge_size ** 2
    return _long_side_knob(image, lambda h, w: ip.get_number_of_image_patches(h, w, {}) // merge,
                           min_area=int(ip.size["shortest_edge"]))


def anyres_knob(processor: Any, image: Image.Image) -> Knob:
    """LLaVA-NeXT / OneVision: the processor's own placeholder count for an image of that size."""
    return _long_side_knob(
        image, lambda h, w: int(processor._get_num_multimodal_tokens(image_sizes=[(h, w)]).num_image_tokens[0]))


def tile_knob(processor: Any, image: Image.Image) -> Knob:
    """InternVL: the tile budget `max_patches` from the processor's `min_patches` to its `max_patches`."""
    ip = processor.image_processor
    width, height = image.size
    low, high = int(ip.min_patches), int(ip.max_patches)

    def tokens(m: int) -> int:
        tiles = processor._get_num_multimodal_tokens(image_sizes=[(height, width)], max_patches=m)
        return int(tiles.num_image_patches[0]) * int(processor.image_seq_length)

    def apply(m: int, resample: str) -> tuple[Image.Image, dict[str, Any]]:
        del resample  # the image is not resized: the processor cuts fewer tiles
        return image, ({} if m == high else {"max_patches": m})

    return Knob("max tiles", low, high, tokens, apply)  # a call argument: the family says input_per_call
