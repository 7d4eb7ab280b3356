"""Pre-LLM methods that work in the vision encoder's feature space: run on the projector INPUT.

VisionZip and PruMerge(+) merge the selected encoder features before the projector (official
`CLIPVisionTower.forward` returns the merged features, which are then projected). Where the
family's projector input is row-aligned with its output (`Seams.projector_rows`: LLaVA-1.5's
[images, N, D_v] patch features, InternVL's pixel-shuffled [tiles, 256, 4 D_v]), a forward
pre-hook on the projector runs the method on those rows, writes the merged values into the
projector input, and records which rows stay; the projector then maps the merged features and
the LLM entry drops the other rows, as for any pre-LLM method.
"""

from __future__ import annotations

import torch

from prunebench.stages.vision import PreLLMSelect

PROJECTOR_INPUT = "projector_input"


class PreProjectorSelect(PreLLMSelect):
    """A pre-LLM select method applied to the projector input, one image (tile) at a time."""

    def register(self) -> list:
        handles = self.signals.register() if self.signals is not None else []
        return handles + [self.seams.visual_output.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        feats = args[0]  # [units, N, D_v], row-aligned with the projector output
        tokens = list(feats)
        grids = self.seams.visual_grids(args, kwargs, tokens)
        signals = self.signals.take(len(tokens)) if self.signals is not None else [{}] * len(tokens)
        self.state.visual_sizes = (self.state.visual_sizes or []) + [x.shape[0] for x in tokens]
        with self.timer.span("method"):
            keeps, merged = self._select_each(zip(tokens, grids, signals, strict=True), len(tokens))
        if any(new is not None for new in merged):
            feats = feats.clone()
            for unit, (kept, new) in enumerate(zip(keeps, merged, strict=True)):
                if new is not None:
                    feats[unit, kept] = new.to(feats)
        self._hand_on(keeps, [None] * len(tokens))  # the merged values are projected in place
        return (feats, *args[1:]), kwargs
