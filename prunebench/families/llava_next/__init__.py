"""LLaVA-NeXT and LLaVA-OneVision/LLaVA-Video adapters (HF-native classes).

LLaVA-NeXT (`LlavaNextForConditionalGeneration`) and LLaVA-OneVision (`LlavaOnevision...`,
also the class of LLaVA-Video-7B-Qwen2-hf): any-resolution views are projected, unpadded and
packed with one learned newline token per feature row; `get_image_features` returns the packed
tokens per image, `get_video_features` [videos, frames x pooled + 1 newline, D]. Those packed
tokens are the pre-LLM seam (a per-instance wrapper of the two methods); the budget is global
per image and per frame for videos; newline tokens are always kept and not part of the budget.
Vision-stage merges: LLaVA-NeXT images (`_next_image_hand_on`) and LLaVA-OneVision / LLaVA-Video
videos (`_onevision_video_hand_on`); OneVision images refuse them with a message.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from prunebench.families import Family, hf_class, lazy
from prunebench.families.llava import feeding_layers, merging_layer_class
from prunebench.seams import Seams, apply_rope

# how an image's resolution sets its visual tokens (the input stage, `method=downsample`)
INPUT_KNOB = lazy("prunebench.families.resolution:anyres_knob")

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


def _onevision_video_hand_on(inner: nn.Module, side: int, pooled: int):
    """How vision-stage merges reach the LLM for LLaVA-OneVision/LLaVA-Video videos.

    Our stated design (papers/evoprune.txt leaves it open): the in-encoder merges replace HF's
    bilinear pooling. Each frame is merged from side x side patches to round(keep * pooled)
    tokens; `apply_pooling` then only pads the frame to its `pooled` placeholder slots, the merged
    tokens first (raster order of their representatives), and the LLM entry drops the padding.
    With keep=1.0 nothing is merged and the family's own pooling runs. Images (any-resolution
    packing) are refused while merges are active.
    """
    from prunebench.stages.patches import AttrOverride, MethodWrap

    def hand_on(merge: object) -> list[object]:
        state = merge.state

        def pooling(x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] == side * side:
                return type(inner).apply_pooling(inner, x)
            pad = x.new_zeros(x.shape[0], pooled - x.shape[1], x.shape[2])
            return torch.cat([x, pad], dim=1)

        def after_video(owner: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            pixels = kwargs.get("pixel_values_videos", args[0] if args else None)
            videos, frames = pixels.shape[:2]
            k = merge.n_keep if merge.active else pooled
            frame_keep = torch.arange(k, device=pixels.device)
            sizes = ([pooled] * frames + [1]) * videos
            keeps = ([frame_keep] * frames + [torch.zeros(1, dtype=torch.long, device=pixels.device)]) * videos
            state.visual_sizes = (state.visual_sizes or []) + sizes
            state.visual_keep = (state.visual_keep or []) + keeps
            state.fixed += videos
            state.clamped |= merge.clamped
            state.unit_clamped += ([merge.clamped] * frames + [False]) * videos  # per unit, for batch rows
            state.unit_fixed += ([0] * frames + [1]) * videos

        def refuse_images(owner: nn.Module, args: tuple, kwargs: dict) -> None:
            if merge.active:
                raise RuntimeError("vision-stage merges on llava_onevision take videos only "
                                   "(images are packed at any resolution on the full grid)")

        return [AttrOverride(inner, "apply_pooling", pooling),
                MethodWrap(inner, "get_video_features", after=after_video),
                MethodWrap(inner, "get_image_features", before=refuse_images)]

    return hand_on


def _next_image_hand_on(inner: nn.Module):
    """How vision-stage merges reach the LLM for LLaVA-NeXT any-resolution images.

    Each view (base image and crops) is merged inside CLIP to round(keep * 576) tokens, scattered
    back onto its full grid at the projector output (as for LLaVA-1.5), and packed by the model as
    usual. Which packed rows survive is found by packing a marker through the model's own
    `pack_image_features` (channel 0: kept patch 1, merged-away 0, newline 2; channel 1: the patch's
    id over the views, newline -1), so unpadding and newline layout are exactly the model's; newlines
    are kept outside the budget. The ids carry the merge groups into the packed space (`packed_groups`).
    """
    from prunebench.stages.patches import MethodWrap

    def hand_on(merge: object) -> list[object]:
        state = merge.state

        def to_packed(owner: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
            features = kwargs.get("image_features", args[0] if args else None)
            views = [f.shape[0] for f in features]
            n = features[0].shape[1]
            marks = torch.zeros(sum(views), n, 2, device=features[0].device)
            marks[..., 1] = torch.arange(sum(views) * n, device=marks.device).view(-1, n).float()  # exact < 2**24
            for view, keep in enumerate(state.visual_keep):
                marks[view, keep, 0] = 1.0
            packed, _ = type(owner).pack_image_features(
                owner, list(marks.split(views)), kwargs.get("image_sizes", args[1] if len(args) > 1 else None),
                kwargs.get("vision_feature_select_strategy", args[2] if len(args) > 2 else None),
                image_newline=torch.tensor([2.0, -1.0], device=marks.device))
            groups, state.visual_groups = state.visual_groups, None
            if groups is not None and len(groups) == sum(views):  # for the record (`kept.py`)
                state.visual_groups = packed_groups([p[:, 1].round().long() for p in packed], groups, n)
            state.visual_sizes = [p.shape[0] for p in packed]
            state.visual_keep = [(p[:, 0] > 0).nonzero()[:, 0] for p in packed]
            newlines = [int((p[:, 0] == 2).sum()) for p in packed]
            state.fixed += sum(newlines)
            state.unit_clamped, state.unit_fixed = [merge.clamped] * len(packed), newlines  # per image

        return [merge.seams.visual_output.register_forward_hook(merge._finish),
                MethodWrap(inner, "pack_image_features", after=to_packed)]

    return hand_on


def packed_groups(ids: list[torch.Tensor], groups: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Merge groups per view -> per packed image. ids: per image, each packed token's patch id over the views
    (view * n + patch, -1 a newline); groups: per view, each patch's kept patch (view-local). Returns per image,
    each packed token's packed index of the token holding it (a newline: itself; -1: merged into a patch
    that unpadding cut off)."""
    target = torch.cat([g.to(ids[0].device) + v * n for v, g in enumerate(groups)])  # id -> its holder's id
    where = torch.full_like(target, -1)  # id -> packed index in its image
    for image in ids:
        patch = image >= 0
        where[image[patch]] = patch.nonzero()[:, 0]
    out = []
    for image in ids:
        into = torch.arange(image.numel(), device=image.device)
        patch = image >= 0
        into[patch] = where[target[image[patch]]]
        out.append(into)
    return out


def packed_seams(model: nn.Module) -> Seams:
    """LLaVA-NeXT and LLaVA-OneVision: packed any-resolution tokens with row newlines."""
    cfg, inner = model.config, model.model
    video = getattr(cfg, "video_token_id", None)
    newline = inner.image_newline
    layers = list(inner.vision_tower.encoder.layers)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    pooled = math.ceil(side / 2) ** 2  # LlavaOnevisionModel.apply_pooling: bilinear to ceil(h/2) x ceil(w/2)
    video_merges = video is not None and isinstance(cfg.vision_feature_layer, int)
    image_merges = video is None and isinstance(cfg.vision_feature_layer, int)  # LLaVA-NeXT
    merges = video_merges or image_merges
    if video_merges:
        hand_on = _onevision_video_hand_on(inner, side, pooled)
    elif image_merges:
        hand_on = _next_image_hand_on(inner)
    else:
        hand_on = None

    def is_newline(x: torch.Tensor) -> torch.Tensor:
        return (x == newline.to(x)).all(dim=-1)

    return Seams(
        input_knob=INPUT_KNOB,
        family=cfg.model_type,
        multimodal=inner,
        image_token_ids=(cfg.image_token_id,) + ((video,) if video is not None else ()),
        visual_output=inner.multi_modal_projector,
        split_visual=_packed,
        visual_grids=lambda args, kwargs, tokens: [None] * len(tokens),
        vision_tower=inner.vision_tower,
        vision_layers=layers[: feeding_layers(len(layers), cfg.vision_feature_layer)] if merges else layers,
        vision_grid=(side, side) if merges else None,
        vision_prefix=1 if cfg.vision_feature_select_strategy == "default" else 0,
        merge_layer_class=merging_layer_class(type(layers[0])) if merges else None,
        language_model=inner.language_model,
        decoder_layers=list(inner.language_model.layers),
        apply_rope=apply_rope,
        vision_budget_base=pooled if video_merges else None,
        vision_hand_on=hand_on,
        visual_fns={"get_image_features": _packed, **({"get_video_features": _video_frames} if video is not None else {})},
        always_keep=is_newline,
        visual_layout=lambda inputs: packed_layout(inner, inputs, side, pooled),
    )


def packed_layout(inner: nn.Module, inputs: Any, side: int, pooled: int) -> list[dict[str, Any]]:
    """Images: the base view (side x side), then the packed views as the model's own `pack_image_features` lays
    them out (unpadded, maybe downsampled, one newline per row; found by packing a marker, no encoder run), or
    one view and its closing newline. Videos: per frame ceil(side/2)^2 pooled tokens, then one newline."""
    units: list[dict[str, Any]] = []
    if "pixel_values_videos" in inputs:
        videos, frames = inputs["pixel_values_videos"].shape[:2]
        p = math.isqrt(pooled)
        for v in range(videos):
            units += [{"kind": "frame", "image": v, "frame": f, "grid": [p, p]} for f in range(frames)]
            units.append({"kind": "newline", "image": v, "grid": [1, 1]})
    if "pixel_values" not in inputs:
        return units
    for i, packed in enumerate(_packed_marks(inner, inputs["image_sizes"], side)):
        if packed.shape[0] == side * side + 1:  # one view, then its newline
            units += [{"kind": "image", "image": i, "grid": [side, side]}, {"kind": "newline", "image": i, "grid": [1, 1]}]
            continue
        rows = int((packed[side * side :] == 2).sum())
        cols = (packed.shape[0] - side * side) // rows - 1
        units += [{"kind": "base", "image": i, "grid": [side, side]},
                  {"kind": "views", "image": i, "grid": [rows, cols], "newline": True}]
    return units


def _packed_marks(inner: nn.Module, image_sizes: torch.Tensor, side: int) -> list[torch.Tensor]:
    """Per image, its packed tokens as the model packs them: 1 a patch, 2 a newline."""
    import importlib
    import inspect

    cfg = inner.config
    module = importlib.import_module(type(inner).__module__)
    views = [module.image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                              patch_size=cfg.vision_config.image_size) for s in image_sizes]
    marks = [torch.ones(v, side * side, 1) for v in views]
    kwargs: dict[str, Any] = {"image_newline": torch.full((1,), 2.0)}
    params = inspect.signature(type(inner).pack_image_features).parameters
    if "vision_feature_select_strategy" in params:
        kwargs["vision_feature_select_strategy"] = cfg.vision_feature_select_strategy
    if "vision_aspect_ratio" in params:
        kwargs["vision_aspect_ratio"] = getattr(cfg, "vision_aspect_ratio", "anyres_max_9")
    packed, _ = type(inner).pack_image_features(inner, marks, image_sizes.cpu(), **kwargs)
    return [p[:, 0] for p in packed]


_LOCAL = lazy("prunebench.fixtures.tiny_families:family_local_processor")
_LOAD = lazy("prunebench.families.processors:load_processor")  # torchvision-free (5.23 needs it otherwise)
FAMILY_ENTRIES = (
    Family("llava_next", hf_class("LlavaNextForConditionalGeneration"), packed_seams, _LOCAL, _LOAD,
           tiny="prunebench.fixtures.tiny_families:build_tiny_llava_next", tiny_image_side=48,
           input_knob=INPUT_KNOB),
    Family("llava_onevision", hf_class("LlavaOnevisionForConditionalGeneration"), packed_seams, _LOCAL,
           _LOAD, tiny="prunebench.fixtures.tiny_families:build_tiny_onevision", tiny_image_side=48,
           input_knob=INPUT_KNOB),
)
