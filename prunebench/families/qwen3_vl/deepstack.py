"""Qwen3-VL's DeepStack under pruning: every injected level loses exactly the visual tokens the LLM input lost.

`Qwen3VLModel.forward` hands the language model `visual_pos_masks` [B, L] (the visual rows of the prompt) and
`deepstack_visual_embeds` (one [n_visual, D] tensor per level, rows in mask order, row-major), and
`Qwen3VLTextModel._deepstack_process(hidden, mask, embeds)` adds level i to the visual rows of decoder layer i's
output. Pruning shortens the sequence at the LLM entry and / or at layer K, so a per-instance wrapper of
`_deepstack_process` maps the prompt's mask and rows onto the rows now in the sequence: the entry compaction's
rows, composed with the intra-LLM compaction in force (`CallState.entry`, `CallState.intra`). Filler rows of
re-padded batches and rows an intra-LLM stage inserted get no DeepStack row. Decode steps carry no DeepStack.

Inside the ViT (vision-stage merges), each level's merger runs on the units alive at its block; `scatter` puts
its output back at full length like the main merger's, so the LLM entry drops the same units from every level.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from prunebench.stages.patches import AttrOverride
from prunebench.stages.state import CallState

NOTE = ("qwen3_vl DeepStack: each level keeps the rows of the visual tokens the LLM keeps; a token whose value a "
        "method rewrote (pooled, merged) keeps its own position's DeepStack features (not pooled or merged)")


class DeepStack:
    """The DeepStack levels of one loaded Qwen3-VL (`Seams.deepstack`)."""

    note = NOTE

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual

    def follow(self, language_model: nn.Module, state: CallState) -> list[AttrOverride]:
        """Shadow the language model's `_deepstack_process` so it sees the rows the stages left."""

        def process(hidden: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
            index, fillers = current_rows(state)
            if index is not None:
                mask, embeds = shortened(mask, embeds, index.to(mask.device), fillers)
            return type(language_model)._deepstack_process(language_model, hidden, mask, embeds)

        return [AttrOverride(language_model, "_deepstack_process", process)]

    def scatter_levels(self, full_length: Callable[[torch.Tensor], torch.Tensor]) -> list:
        """Forward hooks putting each level's merger output back at full length (vision-stage merges)."""
        return [merger.register_forward_hook(lambda module, args, output: full_length(output))
                for merger in self.visual.deepstack_merger_list]


def current_rows(state: CallState) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The rows of the prompt's sequence now in the LLM ([B, L'] indices, None = all) and the filler / inserted
    rows among them ([B, L'] bool, or None)."""
    entry, intra = state.entry, state.intra
    if intra is None:
        return (None, None) if entry is None else (entry.index, entry.pad)
    if entry is None:
        return intra.index, _union(intra.pad, intra.inserted)
    entry_pad = None if entry.pad is None else entry.pad.gather(1, intra.index)
    return entry.index.gather(1, intra.index), _union(entry_pad, intra.pad, intra.inserted)


def _union(*masks: torch.Tensor | None) -> torch.Tensor | None:
    present = [m for m in masks if m is not None]
    return functools.reduce(lambda x, y: x | y.to(x.device), present) if present else None


def shortened(mask: torch.Tensor, embeds: torch.Tensor, index: torch.Tensor, fillers: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [B, L] bool, embeds [mask.sum(), D] (rows in row-major mask order), index [B, L'] rows of the L ->
    the mask over the L' rows and the embeds rows of the visual rows among them (same order)."""
    rank = mask.flatten().long().cumsum(0).view_as(mask) - 1  # DeepStack row of each visual position
    kept = mask.gather(1, index)
    if fillers is not None:
        kept &= ~fillers.to(kept.device)
    return kept, embeds[rank.gather(1, index)[kept].to(embeds.device)]
