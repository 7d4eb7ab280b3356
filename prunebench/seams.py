"""What a family adapter provides: where each stage sits in one model family (its seams)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# (module args, module kwargs, module output) -> one [N_i, D] tensor per image (or video frame group)
SplitVisual = Callable[[tuple, dict, Any], list[torch.Tensor]]
# (module args, module kwargs, per-image tokens) -> (h, w) grid of each image, None when not a grid
VisualGrids = Callable[[tuple, dict, list[torch.Tensor]], list[tuple[int, int] | None]]


@dataclass(frozen=True)
class DecoderAccess:
    """How the stages read a decoder layer's attention inputs, so they name no attribute of a family's LLM.

    The default is transformers' Llama / Qwen2 layout (`self_attn.{q,k}_proj`, `input_layernorm`, the model's
    `norm` and `rotary_emb(hidden, position_ids=...)`). qk_norm: Qwen3 normalises each head of q and k (RMSNorm
    `self_attn.{q,k}_norm`) between the projections and RoPE, so the rows recomputed from captured q/k must be
    read after those norms.
    """

    qk_norm: bool = False

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def qk_modules(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs are q / k right before RoPE (see `flat`)."""
        attn = self.attention(layer)
        return (attn.q_norm, attn.k_norm) if self.qk_norm else (attn.q_proj, attn.k_proj)

    @staticmethod
    def flat(output: torch.Tensor) -> torch.Tensor:
        """A q/k module's output as [B, L, heads*d] (the per-head norms return [B, L, heads, d])."""
        return output.flatten(2) if output.dim() == 4 else output

    def queries_keys(self, layer: nn.Module, hidden: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s q of hidden[:, rows] and k of all of hidden [B, L, D], pre-RoPE: [B, H, R, d], [B, Hkv, L, d]
        (its input norm and projections, as its own forward computes them)."""
        attn = self.attention(layer)
        b, length, _ = hidden.shape
        normed = layer.input_layernorm(hidden)
        q = attn.q_proj(normed[:, rows])
        q = q.view(b, q.shape[1], -1, attn.head_dim)
        k = attn.k_proj(normed).view(b, length, -1, attn.head_dim)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2)

    def final_norm(self, language_model: nn.Module) -> nn.Module:
        return language_model.norm

    def rotary(self, language_model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the LLM's rotary embedding at position_ids."""
        return language_model.rotary_emb(hidden, position_ids=position_ids)


@dataclass
class Seams:
    """Module handles of one loaded model, as the stage hooks need them.

    multimodal: the module whose forward receives `input_ids` and scatters visual tokens
        (LLaVA: `model.model`); its pre-hook finds the image-token positions.
    image_token_ids: the placeholder ids visual tokens are scattered into (image, video).
    visual_output: the module whose output holds the visual tokens in LLM space, in the order
        they are scattered (the pre-LLM seam; LLaVA: the projector); `split_visual` turns its
        output into one [N_i, D] tensor per image and `visual_grids` gives their (h, w) grids.
    vision_tower / vision_layers: the encoder and the layers that feed the selected features
        (LLaVA-1.5 selects layer -2, so the last CLIP layer is not among them).
    vision_grid: the encoder's fixed patch grid, or None when the family cannot host
        vision-stage merges yet (dynamic resolution).
    vision_prefix: tokens ahead of the patches in the encoder sequence (CLIP's [CLS]: 1).
    merge_layer_class: per-instance class swap that calls `self._pb_merge(x)` between the
        encoder layer's attention and MLP (ToMe `tome/patch/timm.py` style), or None.
    language_model / decoder_layers: the LLM stack (entry compaction, intra-LLM seam).
    apply_rope: (x [B, h, T, d], cos [B, T, d], sin) -> x, the family's rotary embedding.
    mrope: multi-axis rotary positions (Qwen M-RoPE): only original positions are defined.
    decoder: how the LLM's attention inputs are read (`DecoderAccess`).
    visual_fns / always_keep: see the fields.
    """

    family: str
    multimodal: nn.Module
    image_token_ids: tuple[int, ...]
    visual_output: nn.Module
    split_visual: SplitVisual
    visual_grids: VisualGrids
    vision_tower: nn.Module
    vision_layers: list[nn.Module]
    vision_grid: tuple[int, int] | None
    vision_prefix: int
    merge_layer_class: type[nn.Module] | None
    language_model: nn.Module
    decoder_layers: list[nn.Module]
    apply_rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    mrope: bool = False
    decoder: DecoderAccess = field(default_factory=DecoderAccess)
    # Methods of `multimodal` whose return value holds the visual tokens as scattered (e.g. the
    # packed any-resolution features of LLaVA-NeXT), each with its own split into budget units;
    # when set, the pre-LLM seam wraps these instead of hooking `visual_output` (which then only
    # marks the end of vision timing).
    visual_fns: dict[str, SplitVisual] = field(default_factory=dict)
    # [N_i, D] -> [N_i] bool: tokens that are always kept and not part of the budget (newlines)
    always_keep: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Vision-stage merges: the tokens per image/frame a keep fraction refers to, when the family
    # reduces the encoder's patches itself (LLaVA-OneVision's video pooling), and how merged
    # tokens reach the LLM placeholders: None = scatter onto the full grid at `visual_output`,
    # else a function installing the family's own hand-on (returns removable handles).
    vision_budget_base: int | None = None
    vision_hand_on: Callable[[Any], list[Any]] | None = None
    # A family-specific vision-stage driver replacing `stages.vision.VisionMerge` (same
    # constructor and register()/restore()/schedule contract), e.g. Qwen's 2x2-unit merges.
    vision_driver: Any = None
    # A family-specific encoder-signal reader replacing `stages.vision_signals.VisionSignals` (a subclass:
    # the Qwen ViT's fused qkv over a packed, windowed sequence), and for per-view encoders the patches each
    # LLM token folds: side -> [U, g] raster patch indices (InternVL's pixel shuffle), None = one patch a token.
    vision_signals: Any = None
    signal_groups: Callable[[int], torch.Tensor] | None = None
    # Visual features a family injects into the LLM beside its input (Qwen3-VL's DeepStack levels): an object with
    # `follow(language_model, state) -> handles` keeping them in step with the rows the stages leave, `note` (for
    # the record) and `scatter_levels(full_length) -> handles` for vision-stage merges; None = no such features.
    deepstack: Any = None
    # The first argument of `visual_output` (the projector) is [units, N, D_v], row i of unit u
    # becoming output row i of unit u: methods working in encoder feature space (VisionZip,
    # PruMerge) run on it (`stages/vision_preproj.py`); False = they run on the output.
    projector_rows: bool = False
    # (the batch's processor inputs) -> the layout units of its visual tokens in scatter order, each
    # {"kind", "image", "grid": [h, w], ...} (`prunebench/kept.py`); None: the record stores no layout
    visual_layout: Callable[[Any], list[dict[str, Any]]] | None = None
    # (processor, image) -> how the image's resolution sets its visual tokens (`families/resolution.py` `Knob`),
    # for input-stage methods (`method=downsample`); None = a fixed input resolution (LLaVA-1.5)
    input_knob: Callable[[Any, Any], Any] | None = None

    @property
    def n_vision_patches(self) -> int:
        if self.vision_grid is None:
            raise ValueError(f"{self.family}: no fixed vision grid")
        return self.vision_grid[0] * self.vision_grid[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding on x [B, h, T, d] with cos/sin [B, T, d], as Llama's and Qwen2's
    `apply_rotary_pos_emb` (Qwen2.5-VL's M-RoPE sections are already folded into cos/sin)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


_MERGING: dict[tuple[type, Callable[..., Any]], type] = {}


def merging_subclass(base: type[nn.Module], forward: Callable[..., Any]) -> type[nn.Module]:
    """A cached subclass of an encoder layer class whose `forward` adds the merge step (`forward`
    mirrors the base's line for line and calls `self._pb_merge`). A subclass, so isinstance still
    holds and transformers' hidden-state capture keeps working after the per-instance class swap."""
    key = (base, forward)
    if key not in _MERGING:
        _MERGING[key] = type(f"Merging{base.__name__}", (base,), {"forward": forward})
    return _MERGING[key]
