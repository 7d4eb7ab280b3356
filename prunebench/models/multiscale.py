"""InternVL3, LLaVA-NeXT and LLaVA-OneVision/LLaVA-Video adapters (HF-native classes).

- InternVL3 (`InternVLForConditionalGeneration`, `models/internvl/modeling_internvl.py`): each
  448 px tile is encoded by InternViT ([CLS] dropped), pixel-shuffled 2x2 and projected; the
  projector output [tiles, 256, D] is the pre-LLM seam. The processor does not tell the model
  which tiles belong to which image, so budgets are per tile (as UniPruneBench pools each tile).
- LLaVA-NeXT (`LlavaNextForConditionalGeneration`) and LLaVA-OneVision (`LlavaOnevision...`,
  also the class of LLaVA-Video-7B-Qwen2-hf): any-resolution views are projected, unpadded and
  packed with one learned newline token per feature row; `get_image_features` returns the packed
  tokens per image, `get_video_features` [videos, frames x pooled + 1 newline, D]. Those packed
  tokens are the pre-LLM seam (a per-instance wrapper of the two methods); the budget is global
  per image and per frame for videos; newline tokens are always kept and not part of the budget.
Vision-stage merges are not wired for these families yet and are refused with a message.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunebench.models.base import Seams, apply_rope


def _per_row(args: tuple, kwargs: dict, output: torch.Tensor) -> list[torch.Tensor]:
    return list(output)


def _square_grids(args: tuple, kwargs: dict, tokens: list[torch.Tensor]) -> list[tuple[int, int] | None]:
    sides = [math.isqrt(t.shape[0]) for t in tokens]
    return [(s, s) if s * s == t.shape[0] else None for s, t in zip(sides, tokens, strict=True)]


def internvl_seams(model: nn.Module) -> Seams:
    cfg, inner = model.config, model.model
    return Seams(
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
    )


def _packed(args: tuple, kwargs: dict, output: object) -> list[torch.Tensor]:
    return list(output.pooler_output)


def _video_frames(args: tuple, kwargs: dict, output: object) -> list[torch.Tensor]:
    """[videos, T*P + 1, D] -> per video: T frames of P tokens, then its closing newline (budget per frame)."""
    pixels = kwargs.get("pixel_values_videos", args[0] if args else None)
    frames = pixels.shape[1]
    chunks = []
    for video in output.pooler_output:
        per_frame = (video.shape[0] - 1) // frames
        chunks += list(video[: frames * per_frame].split(per_frame)) + [video[frames * per_frame :]]
    return chunks


def packed_seams(model: nn.Module) -> Seams:
    """LLaVA-NeXT and LLaVA-OneVision: packed any-resolution tokens with row newlines."""
    cfg, inner = model.config, model.model
    video = getattr(cfg, "video_token_id", None)
    newline = inner.image_newline

    def is_newline(x: torch.Tensor) -> torch.Tensor:
        return (x == newline.to(x)).all(dim=-1)

    return Seams(
        family=cfg.model_type,
        multimodal=inner,
        image_token_ids=(cfg.image_token_id,) + ((video,) if video is not None else ()),
        visual_output=inner.multi_modal_projector,
        split_visual=_packed,
        visual_grids=lambda args, kwargs, tokens: [None] * len(tokens),
        vision_tower=inner.vision_tower,
        vision_layers=list(inner.vision_tower.encoder.layers),
        vision_grid=None,
        vision_prefix=0,
        merge_layer_class=None,
        language_model=inner.language_model,
        decoder_layers=list(inner.language_model.layers),
        apply_rope=apply_rope,
        visual_fns={"get_image_features": _packed, **({"get_video_features": _video_frames} if video is not None else {})},
        always_keep=is_newline,
    )
