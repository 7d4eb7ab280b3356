"""MustDrop's vision-encoder stages, installed together with its LLM stages (`method=mustdrop`).

Official order (`clip_encoder.py` `CLIPVisionModelAcc.custom_forward`): after CLIP layer 0 (its
whole output, after the MLP) the 3x3 window merge; at the last CLIP layer the key set from that
layer's head-mean [CLS] attention row over the (merged) patches. The key set then travels as a
bool per visual token to the LLM entry (`CallState.visual_protect`), which turns it into the rows
the LLM stages never drop (`CallState.protected`, the `key_set` signal).

The merge bookkeeping is `VisionMerge`'s (`MergeState` size / rep). With the official token order
(`token_order=merged_first`) the encoder runs on [CLS, merged windows by score, unmerged in raster order]
and the LLM reads the image in that order: the surviving tokens fill the image block's kept slots (the
sorted representatives, closed up at the LLM entry) in encoder order, as the official LLaVA code
concatenates the image features. With `token_order=raster` every token stands at its representative's
raster slot, as ToMe / EvoPrune tokens do.
"""

from __future__ import annotations

import torch

from prunebench.errors import UserError
from prunebench.methods.base import ResolvedMethod
from prunebench.methods.mustdrop_ops import key_set, window_merge
from prunebench.seams import Seams
from prunebench.stages.state import CallState
from prunebench.stages.vision import MergeState, VisionMerge, capture_output
from prunebench.stages.vision_signals import cls_row_and_keys, encoder_layers
from prunebench.timing import Timer


def check_family(seams: Seams, name: str) -> None:
    """The window merge needs one fixed patch grid behind one [CLS] token, handed to the LLM as is."""
    if (seams.vision_driver is not None or seams.vision_hand_on is not None or seams.vision_grid is None
            or seams.vision_prefix != 1):
        raise UserError(f"{name}: its vision-encoder stages (window merge, [CLS] key set) are not supported on the "
                        f"{seams.family} family; set method.params.vision_stages=false to run its LLM stages only")


class MustDropVision(VisionMerge):
    """Window merge after encoder layer 0, key set at the last encoder layer, hand-on at the projector."""

    def __init__(self, seams: Seams, method: ResolvedMethod, keep: float, state: CallState, timer: Timer) -> None:
        check_family(seams, method.name)
        self.seams, self.method, self.state, self.timer = seams, method, state, timer
        params = method.params
        self.window, self.threshold, self.ratio = int(params["window"]), float(params["merge_thr"]), \
            float(params["key_ratio"])
        self.order = str(params["token_order"])
        h, w = seams.vision_grid
        if h % self.window or w % self.window:
            raise UserError(f"{method.name}: window={self.window} does not divide the {h}x{w} patch grid of the "
                            f"{seams.family} family; valid: a divisor of {h} and {w} (official 3 on 24x24)")
        self.clamped, self.schedule, self.notes = False, None, []
        self.swaps = None
        self.last = encoder_layers(seams)[-1]  # official idx 23 of CLIP-L's 24 layers
        self._captured: dict[str, torch.Tensor] = {}
        self._key: torch.Tensor | None = None  # [B, M] bool over the patch tokens of the current call

    def register(self) -> list:
        s = self.seams
        attn = self.last.self_attn
        first = encoder_layers(s)[0]
        return [
            s.vision_tower.register_forward_pre_hook(self._start, with_kwargs=True),
            # prepend: before transformers' own hooks that record hidden_states
            first.register_forward_hook(self._merge, prepend=True),
            attn.q_proj.register_forward_hook(capture_output(self._captured, "q")),
            attn.k_proj.register_forward_hook(capture_output(self._captured, "k")),
            self.last.register_forward_hook(self._key_set),
            s.visual_output.register_forward_hook(self._finish),
        ]

    def restore(self) -> None:  # hooks only, no class swaps
        return None

    def _merge(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        state: MergeState = self.state.vision
        with self.timer.span("method"):
            out = window_merge(output, state.size, state.rep, self.seams.vision_grid, self.window, self.threshold,
                               prefix=self.seams.vision_prefix, order=self.order)
        # bookkeeping for the record (`kept.py`), outside the method's span
        group = None if state.group is None else out.old_to_new.gather(1, state.group)
        self.state.vision = MergeState(size=out.size, rep=out.rep, group=group)
        return out.x

    def _key_set(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        """Head-mean [CLS] row of the last layer, recomputed from its own q/k (official: eager attentions)."""
        attn = self.last.self_attn
        q_out, k_out = self._captured.pop("q"), self._captured.pop("k")
        b, t, _ = q_out.shape
        q = q_out.view(b, t, -1, attn.head_dim).transpose(1, 2)
        k = k_out.view(b, t, -1, attn.head_dim).transpose(1, 2)
        with self.timer.span("method"):
            row, _ = cls_row_and_keys(q, k, attn.scale)
            self._key = key_set(row, self.ratio)

    def _finish(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        full = super()._finish(module, args, output)
        if self._key is None or self._key.shape != output.shape[:2]:
            raise RuntimeError("mustdrop: the key set was not computed on the tokens the projector saw")
        # The kept slots are the sorted representatives; slot j takes the j-th token in encoder order (its
        # value and its key-set flag), which is the raster order itself under token_order=raster.
        reps = self.state.visual_keep
        self.state.visual_keep = [r.sort().values for r in reps]
        if self.order != "raster":
            self.state.visual_values = list(output)
        self.state.visual_protect = list(self._key)
        self._key = None
        return full
