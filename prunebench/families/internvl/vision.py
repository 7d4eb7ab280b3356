"""Vision-stage merges inside InternViT (InternVL3), on whole pixel-shuffle groups.

InternVL turns each 2x2 group of ViT patches into one LLM token by a pixel shuffle after the
tower (`InternVLModel.pixel_shuffle`, downsample_ratio 0.5). A merge *unit* is such a group; the
groups are read off the model's own `pixel_shuffle` applied to a map of patch indices, so the
grouping is exactly the model's. Before the first encoder layer the patch rows are reordered
unit-major ([CLS], then each unit's 4 rows; attention and the layers are order-equivariant, the
position embeddings were added already). At each scheduled layer, between attention and MLP
(class swap mirroring `InternVLVisionLayer.forward`), EvoPrune's bipartite step decides on the
unit means, with importance = the attention a unit's 4 rows receive (recomputed from the layer's
own normalised q/k), and `merge_units` applies it row by row, so units stay whole. After the
tower, surviving units are scattered back to their patch positions (zeros elsewhere), the pixel
shuffle and projector run as usual, and the LLM entry drops the tokens of merged-away units.
Budget per tile: round(keep * units), as the pre-LLM stage. [CLS] is never merged.
"""

from __future__ import annotations

import torch
from torch import nn

from prunebench.errors import UserError
from prunebench.methods.base import ResolvedMethod, n_keep_for
from prunebench.methods.merge_ops import merge_units
from prunebench.methods.tome_ops import head_mean_keys
from prunebench.seams import Seams, merging_subclass
from prunebench.stages.attention import received_attention
from prunebench.stages.patches import ClassSwaps
from prunebench.stages.state import CallState
from prunebench.stages.vision import capture_output, merge_params, unapplied_prop_attn
from prunebench.timing import Timer


def _merging_layer_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """`InternVLVisionLayer.forward` (transformers 5.23) line for line, plus `self._pb_merge`
    between the first residual connection and the MLP."""
    attention_output, _ = self.attention(self.layernorm_before(hidden_states))
    attention_output = self.lambda_1 * attention_output
    hidden_states = attention_output + hidden_states
    hidden_states = self._pb_merge(hidden_states)
    layer_output = self.layernorm_after(hidden_states)
    layer_output = self.mlp(layer_output)
    layer_output = self.dropout(layer_output)
    if self.lambda_2 is not None:
        layer_output = self.lambda_2 * layer_output
    layer_output = layer_output + hidden_states
    return layer_output


def shuffle_groups(inner: nn.Module, side: int) -> torch.Tensor:
    """[U, 4] patch indices (raster) that the model's pixel shuffle folds into each output token."""
    marks = torch.arange(side * side, dtype=torch.float32).view(1, side, side, 1)
    folded = type(inner).pixel_shuffle(inner, marks, scale_factor=inner.config.downsample_ratio)
    return folded.reshape(-1, folded.shape[-1]).round().long()


class InternVLVisionMerge:
    """EvoPrune inside InternViT on pixel-shuffle groups (see the module docstring)."""

    def __init__(self, seams: Seams, method: ResolvedMethod, keep: float, state: CallState, timer: Timer) -> None:
        inner = seams.multimodal
        if inner.config.vision_feature_layer != -1 or inner.config.vision_feature_select_strategy != "default":
            raise UserError(f"{method.name}: InternVL vision-stage merges expect vision_feature_layer=-1 "
                            "and the 'default' strategy")
        if str(method.params.get("merge_point", "attention")) != "attention":
            raise UserError(f"{method.name}: merge_point must be 'attention' on InternVL")
        self.seams, self.method, self.state, self.timer, self.inner = seams, method, state, timer, inner
        vision = inner.config.vision_config
        self.side = vision.image_size[0] // vision.patch_size[0] if isinstance(vision.image_size, list) \
            else vision.image_size // vision.patch_size
        self.groups = shuffle_groups(inner, self.side)  # [U, 4]
        n_units = self.groups.shape[0]
        self.n_keep, self.clamped = n_keep_for(keep, n_units)
        try:
            self.schedule = method.spec.schedule(str(method.params["schedule"]), len(seams.vision_layers),
                                                 n_units, n_units - self.n_keep)
        except ValueError as err:
            raise UserError(f"{method.name}: {err}") from None
        self.params = merge_params(method)
        self.notes = unapplied_prop_attn(method, seams.family, "InternViT layers take no attention mask")
        self.swaps = ClassSwaps()
        self.units: torch.Tensor | None = None  # [B, U'] unit ids still in the sequence, sequence order
        self.size: torch.Tensor | None = None  # [B, U'] ToMe sizes, in units
        self.group: torch.Tensor | None = None  # [B, U] per unit at entry: the index in `units` of the unit holding it

    def register(self) -> list:
        if sum(self.schedule) == 0:
            return []  # keep=1.0: the encoder is left untouched
        layers = self.seams.vision_layers
        handles = [layers[0].register_forward_pre_hook(self._reorder),
                   self.seams.vision_tower.register_forward_hook(self._scatter_back)]
        for layer, r in zip(layers, self.schedule, strict=True):
            if r == 0:
                continue
            captured: dict[str, torch.Tensor] = {}
            if "received_attention" in self.method.spec.needs:
                handles.append(layer.attention.q_norm.register_forward_hook(capture_output(captured, "q")))
            handles.append(layer.attention.k_norm.register_forward_hook(capture_output(captured, "k")))
            merging = merging_subclass(type(layer), _merging_layer_forward)
            self.swaps.swap(layer, merging, _Step(self, layer, r, captured))
        return handles

    def restore(self) -> None:
        self.swaps.restore()

    def _reorder(self, module: nn.Module, args: tuple) -> tuple:
        """[B, 1 + N, D] raster -> [CLS] + unit-major rows."""
        x = args[0]
        order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + self.groups.flatten()]).to(x.device)
        self.units = torch.arange(self.groups.shape[0], device=x.device).expand(x.shape[0], -1).clone()
        self.size = torch.ones(self.units.shape, device=x.device)
        self.group = self.units.clone()
        return (x[:, order], *args[1:])

    def _scatter_back(self, module: nn.Module, args: tuple, output: object) -> object:
        x = output.last_hidden_state  # [B, 1 + U'*4, D], unit-major
        b, _, d = x.shape
        rows = 1 + self.groups.to(x.device)[self.units]  # [B, U', 4] raster rows of the survivors
        full = x.new_zeros(b, 1 + self.side * self.side, d)
        full[:, 0] = x[:, 0]
        full.scatter_(1, rows.flatten(1)[..., None].expand(-1, -1, d), x[:, 1:])
        output.last_hidden_state = full
        self.state.visual_sizes = (self.state.visual_sizes or []) + [self.groups.shape[0]] * b
        self.state.visual_keep = (self.state.visual_keep or []) + list(self.units.sort(dim=-1).values)
        # for the record (`kept.py`): each unit (= LLM token of its tile) -> the unit it merged into
        self.state.visual_groups = (self.state.visual_groups or []) + list(self.units.gather(1, self.group))
        self.state.clamped |= self.clamped
        return output


class _Step:
    """The merge at one layer: [B, 1 + U*4, D] -> [B, 1 + (U - r)*4, D]."""

    def __init__(self, owner: InternVLVisionMerge, layer: nn.Module, r: int, captured: dict) -> None:
        self.owner, self.layer, self.r, self.captured = owner, layer, r, captured

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        owner, attn = self.owner, self.layer.attention
        with owner.timer.span("method"):
            b, t, d = x.shape
            keys = self.captured.pop("k")
            importance, extra = None, {}
            if "received_attention" in owner.method.spec.needs:
                q = self.captured.pop("q").view(b, t, -1, attn.head_dim).transpose(1, 2)
                k = keys.view(b, t, -1, attn.head_dim).transpose(1, 2)
                importance = received_attention(q, k, attn.scale)[:, 1:].view(b, -1, 4).mean(-1)  # [B, U]
            if "keys" in owner.method.spec.needs:  # ToMe metric per unit: mean of its rows' head-mean keys
                extra["metric"] = head_mean_keys(keys, attn.head_dim)[:, 1:].reshape(b, -1, 4, attn.head_dim).mean(2)
            units = x[:, 1:].reshape(b, -1, 4, d)
            order = torch.arange(units.shape[1], device=x.device).expand(b, -1)  # keep sequence order
            out = owner.method.spec.merge(units.mean(2), owner.size, order, importance, self.r, **owner.params,
                                          **extra)
            kept = [merge_units(units[i], owner.size[i], out.old_to_new[i], out.merged[i]) for i in range(b)]
            owner.units = owner.units[~out.merged].view(b, -1)
            owner.size = out.size
            x = torch.cat([x[:, :1], torch.stack(kept).flatten(1, 2)], dim=1)
        owner.group = out.old_to_new.gather(1, owner.group)  # bookkeeping for the record, outside the span
        return x

