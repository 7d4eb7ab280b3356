"""Vision-encoder signals on the Qwen2.5-VL / Qwen2-VL ViT (`Seams.vision_signals` of this family).

No [CLS]: METHODS.md §0.4 substitute, the mean attention each patch RECEIVES at the chosen block (over queries
and heads, within the attention segment the block uses: its window, or the whole image / temporal slice for
full-attention blocks), averaged per 2x2 merge unit (= LLM token), in raster order; keys: the head-mean
pre-RoPE keys, averaged per unit. The block's fused qkv, cu_seqlens and rotary embeddings are captured from
its own forward (no second forward, no eager attention).
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from prunebench.stages.attention import received_attention
from prunebench.stages.vision_signals import VisionSignals


class QwenVisionSignals(VisionSignals):
    """`VisionSignals` on the Qwen ViT's packed sequence (window order inside, raster order out)."""

    _grid: torch.Tensor | None = None  # grid_thw of the current tower call

    def _capture_qk(self) -> list:
        return [
            self.seams.vision_tower.register_forward_pre_hook(self._tower_start, with_kwargs=True),
            self.layer.register_forward_pre_hook(self._store_kwargs, with_kwargs=True),
            self.layer.attn.qkv.register_forward_hook(functools.partial(self._store, "qkv")),
        ]

    def _features_module(self) -> nn.Module:
        return self.seams.vision_tower.merger

    def _tower_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The call's grid_thw (the window order depends on it)."""
        self._grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

    def _store_kwargs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._captured["cu_seqlens"] = kwargs["cu_seqlens"]
        self._captured["position_embeddings"] = kwargs["position_embeddings"]

    def _store_features(self, module: nn.Module, args: tuple) -> None:
        """The merger input [S, C] in window order -> [U, 4C] per unit, raster order per image / slice."""
        x = args[0]
        m = int(self.seams.vision_tower.spatial_merge_size) ** 2
        units = x.reshape(-1, m * x.shape[-1])
        raster = torch.empty_like(units)
        raster[self._window_index(units.device)] = units
        self.features.extend(raster.split(self._part_sizes()))

    def _part_sizes(self) -> list[int]:
        m = int(self.seams.vision_tower.spatial_merge_size) ** 2
        return [h * w // m for t, h, w in self._grid.tolist() for _ in range(t)]

    def _units(self) -> list[dict[str, torch.Tensor]]:
        """Received attention per segment of this block, per 2x2 unit, raster order per image/slice."""
        visual, attn = self.seams.vision_tower, self.layer.attn
        qkv = self._captured["qkv"]
        s, m = qkv.shape[0], int(visual.spatial_merge_size) ** 2
        q, k, _ = qkv.reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [S, H, d]
        keys = k.float().mean(1)  # pre-RoPE head-mean keys [S, d]
        cos, sin = self._captured["position_embeddings"]
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
        received = torch.zeros(s, dtype=torch.float32, device=qkv.device)
        cu = self._captured["cu_seqlens"].tolist()
        for a, e in zip(cu[:-1], cu[1:], strict=True):
            if e > a:
                received[a:e] = received_attention(q[a:e].transpose(0, 1)[None], k[a:e].transpose(0, 1)[None],
                                                   attn.scaling)[0]
        units = self._raster_units(received.view(-1, m).mean(1), keys.view(-1, m, keys.shape[-1]).mean(1))
        for entry in units:  # no [CLS], no single-head reading: the full-width names get the §0.4 substitute
            entry.update(cls_attention_full=entry["cls_attention"], cls_keys_full=entry["cls_keys"])
        return units

    def _raster_units(self, received: torch.Tensor, keys: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Units in the tower's sequence order -> per image / temporal slice, raster order."""
        order = self._window_index(received.device)  # sequence unit u holds raster unit order[u]
        raster_att = torch.empty_like(received)
        raster_att[order] = received
        raster_keys = torch.empty_like(keys)
        raster_keys[order] = keys
        sizes = self._part_sizes()
        return [{"cls_attention": a, "cls_keys": kk}
                for a, kk in zip(raster_att.split(sizes), raster_keys.split(sizes), strict=True)]

    def _window_index(self, device: torch.device) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        v, grid = self.seams.vision_tower, self._grid
        if getattr(v, "fullatt_block_indexes", None) is None:  # Qwen2-VL: raster order throughout
            return torch.arange(int(sum(t * h * w for t, h, w in grid.tolist())) // v.spatial_merge_size**2,
                                device=device)
        index, _ = get_vision_window_index(grid, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                                           patch_size=v.patch_size, kwargs={})
        return index.to(device)

