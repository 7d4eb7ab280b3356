"""Vision-encoder signals for pre-LLM methods: the [CLS] attention row and the keys at one layer.

FasterVLM, VisPruner, HoloV (and VisionZip, PruMerge) score visual tokens by how much the ViT's
[CLS] query attends to each patch at one encoder layer (METHODS.md §0.3: only that row is needed).
The official code forces eager attention (`output_attentions=True`); here the row is recomputed
from the layer's own captured q/k projections during the normal (SDPA) tower forward:

    cls_attention[i] = mean_h softmax_j(q_cls,h . k_j,h * scale)[1 + i]   (patch i; the softmax
                       runs over [CLS] + all patches, as eager attention's row 0, not renormalised)
    cls_keys[i]      = mean_h k_{1+i},h                                   (VisionZip's head-mean keys)

Per family, aligned with the post-projector visual tokens the pre-LLM method receives:
- LLaVA-1.5 (CLIP, [CLS] at row 0): patch i is visual token i.
- InternVL (InternViT, [CLS] at row 0, then pixel shuffle): a visual token is a 2x2 patch group
  (read off the model's own `pixel_shuffle`, `families/internvl/vision.shuffle_groups`); its signal is the
  mean over the 4 patches of the group.
- Qwen2.5-VL / Qwen2-VL (no [CLS]): METHODS.md §0.4 substitute, the mean attention each patch
  RECEIVES at that block (over queries and heads, within the attention segment the block uses:
  its window, or the whole image / temporal slice for full-attention blocks), averaged per 2x2
  merge unit (= LLM token), in raster order; keys: the head-mean pre-RoPE keys, averaged per unit.
- LLaVA-NeXT (CLIP, [CLS] per view) and LLaVA-OneVision (SigLIP, no [CLS]: the received-attention
  substitute per view, as for Qwen): each view's (base image, crops) patch signals are packed into
  the image's LLM tokens by the model's OWN `pack_image_features` (videos: its own `apply_pooling`
  per frame), all signals stacked as channels of one [views, P, C] tensor. Packing is
  permute / unpad / concat, so a packed token carries exactly the signal of the view and patch it
  comes from (tests/test_packed_signals.py checks it with a view*P + patch marker); where the model
  itself blends patches (OneVision's bilinear video pooling, anyres_max_9 downscaling) the token
  gets the same bilinear mean of its source patches' signals. Newline rows get zeros (never
  candidates: `PreLLMSelect` always keeps them).

The layer: `vision_layer` method parameter, None = the layer whose output the family selects as
its visual feature (LLaVA-1.5 `vision_feature_layer=-2` -> CLIP layer L-2, which is what the
official code reads as `attentions[-2]`), else a Python index into the encoder's layers (-1 = last).
"""

from __future__ import annotations

import functools
from collections import deque

import torch
from torch import nn

from prunebench.errors import UserError
from prunebench.methods.base import ResolvedMethod
from prunebench.seams import Seams
from prunebench.stages.attention import query_rows_attention, received_attention
from prunebench.timing import NullTimer, Timer

# Signals this module computes (declared by a method in `needs`).
VISION_SIGNALS = frozenset({"cls_attention", "cls_keys", "vision_features", "cls_attention_full", "cls_keys_full"})
# PruMerge's reading: one head over the full width (official hooks on q_proj / k_proj, scale width^-1/2).
FULL_WIDTH = frozenset({"cls_attention_full", "cls_keys_full"})


def cls_row_and_keys(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, T, d] q, k of an encoder layer whose row 0 is [CLS] ->
    (cls_attention [B, T-1] float32: head-mean softmax row of [CLS] over all T keys, patch columns;
     cls_keys [B, T-1, d]: head-mean keys of the patches)."""
    row = query_rows_attention(q[:, :, :1], k, scale)[:, 0]  # [B, T]
    return row[:, 1:], k[:, :, 1:].float().mean(dim=1)


def full_width_cls_row(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, C] q, k projections (row 0 = [CLS]) read as ONE head of width C (PruMerge,
    `clip_encoder.py`: softmax(q @ k^T * C^-1/2)) -> (row [B, T-1] float32 over the patches, the
    softmax running over all T keys; keys [B, T-1, C] float32 of the patches)."""
    row = query_rows_attention(q[:, None, :1], k[:, None], k.shape[-1] ** -0.5)[:, 0]  # [B, T]
    return row[:, 1:], k[:, 1:].float()


def stack_channels(entries: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """Per-view signals ({name: [P] or [P, d]}) -> one float32 [views, P, C] tensor and its layout
    (name, width) in channel order, so that the model's own packing moves all signals at once."""
    layout = [(name, 1 if v.dim() == 1 else v.shape[-1]) for name, v in entries[0].items()]
    stacked = torch.stack([torch.cat([e[name].float().reshape(e[name].shape[0], -1) for name, _ in layout], dim=-1)
                           for e in entries])
    return stacked, layout


def unstack_channels(x: torch.Tensor, layout: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """[T, C] packed channels -> {name: [T] or [T, d]} (the inverse of `stack_channels` per token)."""
    parts = x.split([width for _, width in layout], dim=-1)
    return {name: part[:, 0] if name in ("cls_attention", "cls_attention_full") else part
            for (name, _), part in zip(layout, parts, strict=True)}


def encoder_layers(seams: Seams) -> list[nn.Module]:
    """Every layer of the family's vision encoder (the feeding layers may be fewer)."""
    tower = seams.vision_tower
    for path in ("encoder.layers", "encoder.layer", "blocks"):
        obj = tower
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise UserError(f"cls_attention: no encoder layers found on the {seams.family} family")


def layer_index(seams: Seams, method: ResolvedMethod) -> int:
    """The encoder layer the signal is read at (see the module docstring)."""
    n = len(encoder_layers(seams))
    chosen = method.params.get("vision_layer")
    if chosen is None:
        return len(seams.vision_layers) - 1
    if isinstance(chosen, bool) or not isinstance(chosen, int) or not -n <= chosen < n:
        raise UserError(f"{method.name}: vision_layer must be null or an integer in [{-n}, {n - 1}] "
                        f"(encoder layers of {seams.family}), got {chosen!r}")
    return chosen % n


class VisionSignals:
    """Captures the signals at one encoder layer for every tower call and queues them per visual
    unit (image / tile / temporal slice), in the order the pre-LLM seam splits the tokens."""

    def __init__(self, seams: Seams, method: ResolvedMethod, timer: Timer | None = None) -> None:
        self.seams, self.method, self.timer = seams, method, timer or NullTimer()
        self.index = layer_index(seams, method)
        self.layer = encoder_layers(seams)[self.index]
        self.queue: deque[dict[str, torch.Tensor]] = deque()
        self.features: deque[torch.Tensor] = deque()  # pre-projector features per visual unit
        self.want_features = "vision_features" in method.spec.needs
        self._captured: dict[str, object] = {}
        self.packed = seams.always_keep is not None  # LLaVA-NeXT / OneVision: per view, then packed
        self.views: deque[dict[str, torch.Tensor]] = deque()  # packed families: per-view signals

    def register(self) -> list:
        handles = self._capture_qk()
        handles.append(self.layer.register_forward_hook(self._done))
        if self.want_features:
            handles.append(self._features_module().register_forward_pre_hook(self._store_features))
        if self.packed:
            from prunebench.stages.patches import MethodWrap

            inner = self.seams.multimodal
            handles.append(MethodWrap(inner, "pack_image_features", after=self._pack_images))
            if hasattr(inner, "get_video_features"):
                handles.append(MethodWrap(inner, "get_video_features", after=self._pool_videos))
        return handles

    def take(self, n: int) -> list[dict[str, torch.Tensor]]:
        """The signals of the next n visual units."""
        if len(self.queue) < n:
            raise RuntimeError(f"prunebench: {n} visual units reached the pre-LLM seam but the vision "
                               f"encoder gave signals for {len(self.queue)}")
        out = [self.queue.popleft() for _ in range(n)]
        if self.want_features and not self.packed:  # packed: features travel inside the entries
            if len(self.features) < n:
                raise RuntimeError("prunebench: the projector input was not captured for every visual unit")
            for entry in out:
                entry["vision_features"] = self.features.popleft()
        return out

    # -- what a family-specific reader (`Seams.vision_signals`) overrides ----------------------------
    def _capture_qk(self) -> list:
        """Hooks keeping the layer's q and k (per-view encoders: [B, T, heads*d], after InternViT's q/k norms)."""
        attn = self._attention()
        q_mod, k_mod = (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else (attn.q_proj, attn.k_proj)
        return [q_mod.register_forward_hook(functools.partial(self._store, "q")),
                k_mod.register_forward_hook(functools.partial(self._store, "k"))]

    def _attention(self) -> nn.Module:
        return getattr(self.layer, "self_attn", None) or self.layer.attention  # CLIP / SigLIP, InternViT

    def _features_module(self) -> nn.Module:
        """The module whose input is the pre-projector feature of each visual unit."""
        return self.seams.visual_output

    def _units(self) -> list[dict[str, torch.Tensor]]:
        """The signals of the visual units of one tower call, from the captured q/k."""
        return self._cls()

    def _store_features(self, module: nn.Module, args: tuple) -> None:
        """The projector's input: LLaVA [B, N, C] selected CLIP features; InternVL [tiles, U, 4C]
        pixel-shuffled groups; packed families per view."""
        x = args[0]
        if self.packed:  # per view, joined with the view's attention signals when packed
            for entry, feats in zip(list(self.views)[len(self.views) - x.shape[0]:], x, strict=True):
                entry["vision_features"] = feats
            return
        self.features.extend(x)

    # -- hooks ---------------------------------------------------------------------------------
    def _store(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._captured[name] = output

    def _done(self, module: nn.Module, args: tuple, output: object) -> None:
        with torch.no_grad(), self.timer.span("method"):  # the signal is the method's cost (eager in official code)
            if self.packed:
                self.views.extend(self._cls() if self.seams.vision_prefix else self._received())
            else:
                self.queue.extend(self._units())
        self._captured.clear()

    # -- per-view encoders -------------------------------------------------------------------------
    def _cls(self) -> list[dict[str, torch.Tensor]]:
        attn = self._attention()
        q_out, k_out = self._captured["q"], self._captured["k"]
        b, t, _ = q_out.shape
        q = q_out.view(b, t, -1, attn.head_dim).transpose(1, 2)
        k = k_out.view(b, t, -1, attn.head_dim).transpose(1, 2)
        row, keys = cls_row_and_keys(q, k, attn.scale)
        if self.seams.signal_groups is not None:
            row, keys = self._grouped(row, keys)
        out = [{"cls_attention": r, "cls_keys": kk} for r, kk in zip(row, keys, strict=True)]
        if FULL_WIDTH & self.method.spec.needs:
            row, keys = full_width_cls_row(q_out, k_out)
            if self.seams.signal_groups is not None:
                row, keys = self._grouped(row, keys)
            for entry, r, kk in zip(out, row, keys, strict=True):
                entry.update(cls_attention_full=r, cls_keys_full=kk)
        return out

    def _received(self) -> list[dict[str, torch.Tensor]]:
        """No [CLS] (SigLIP): per view, the mean attention each patch receives and the head-mean keys;
        the full-width names get the same substitute (as for Qwen)."""
        attn = self.layer.self_attn
        q_out, k_out = self._captured["q"], self._captured["k"]
        b, t, _ = q_out.shape
        q = q_out.view(b, t, -1, attn.head_dim).transpose(1, 2)
        k = k_out.view(b, t, -1, attn.head_dim).transpose(1, 2)
        row, keys = received_attention(q, k, attn.scale), k.float().mean(dim=1)
        return [{"cls_attention": r, "cls_keys": kk, "cls_attention_full": r, "cls_keys_full": kk}
                for r, kk in zip(row, keys, strict=True)]

    # -- packed families: per-view signals -> the image's packed tokens ------------------------------
    def _take_views(self, n: int) -> list[dict[str, torch.Tensor]]:
        if len(self.views) < n:
            raise RuntimeError(f"prunebench: {n} views were packed but the vision encoder gave signals for "
                               f"{len(self.views)}")
        return [self.views.popleft() for _ in range(n)]

    def _pack_images(self, owner: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        """After the model packs its images: pack the views' signals with the same call."""
        features = kwargs.get("image_features", args[0] if args else None)
        views = [f.shape[0] for f in features]
        rest = {k: v for k, v in kwargs.items() if k not in ("image_features", "image_newline")}
        with torch.no_grad(), self.timer.span("method"):
            stacked, layout = stack_channels(self._take_views(sum(views)))
            packed, _ = type(owner).pack_image_features(
                owner, list(stacked.split(views)), *args[1:], image_newline=stacked.new_zeros(stacked.shape[-1]),
                **rest)
            self.queue.extend(unstack_channels(p, layout) for p in packed)

    def _pool_videos(self, owner: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        """After the model encodes videos: per frame, the signals pooled by the model's own
        `apply_pooling`, then the video's closing newline (zeros), as `_video_frames` splits them."""
        pixels = kwargs.get("pixel_values_videos", args[0] if args else None)
        videos, frames = pixels.shape[:2]
        with torch.no_grad(), self.timer.span("method"):
            stacked, layout = stack_channels(self._take_views(videos * frames))
            pooled = type(owner).apply_pooling(owner, stacked)  # [videos * frames, pooled, C]
            newline = unstack_channels(stacked.new_zeros(1, stacked.shape[-1]), layout)
            for video in pooled.split(frames):
                self.queue.extend(unstack_channels(frame, layout) for frame in video)
                self.queue.append(newline)

    def _grouped(self, row: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch signals [B, N], [B, N, d] -> means over the patches each LLM token folds (`Seams.signal_groups`,
        InternVL's pixel shuffle): [B, U], [B, U, d]."""
        groups = self.seams.signal_groups(int(round(row.shape[1] ** 0.5))).to(row.device)  # [U, g]
        return row[:, groups].mean(-1), keys[:, groups].mean(-2)
