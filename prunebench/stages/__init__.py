"""Install a pruning method at its stage on a loaded model, reversibly.

    with install(model, seams, method, keep=0.111, seed=0) as inst:
        model.generate(**inputs)
        inst.tokens  # visual tokens in / out of the last prompt

Everything is a hook or a per-instance class swap on *this* model; leaving the `with` block
removes every hook and restores every class, so the model is bit-for-bit the one before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from prunebench.methods.base import ResolvedMethod, Stage, n_keep_for
from prunebench.models.base import Seams
from prunebench.stages.llm import IntraLLM, capture_image_positions, llm_entry
from prunebench.stages.state import CallState
from prunebench.stages.vision import PreLLMSelect, VisionMerge
from prunebench.timing import NullTimer, Timer


@dataclass
class TokenCounts:
    """Visual tokens per image: in, reaching the LLM / layer K, and averaged over LLM layers."""

    n_visual_in: int
    n_visual_out: int
    layer_avg: float
    clamped: bool = False  # keep*N rounded to 0, one token kept instead

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"n_visual_in": self.n_visual_in, "n_visual_out": self.n_visual_out,
                "layer_avg": self.layer_avg, "clamped_to_one": self.clamped}


@dataclass
class Installation:
    method: ResolvedMethod
    keep: float
    counts: TokenCounts
    state: CallState
    generator: torch.Generator
    schedule: list[int] | None = None  # per encoder layer merges (vision stage)
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)

    def reseed(self, seed: int) -> None:
        """Fix the random stream of stochastic methods, e.g. per sample: seed + sample index."""
        self.generator.manual_seed(seed)


def plan_counts(seams: Seams, method: ResolvedMethod, keep: float) -> TokenCounts:
    n_in = seams.n_visual
    if method.stage is Stage.NONE:
        return TokenCounts(n_in, n_in, float(n_in))
    n_keep, clamped = n_keep_for(keep, n_in)
    if method.stage is Stage.INTRA_LLM:
        k, n_layers = int(method.params["layer"]), len(seams.decoder_layers)
        return TokenCounts(n_in, n_keep, (k * n_in + (n_layers - k) * n_keep) / n_layers, clamped)
    return TokenCounts(n_in, n_keep, float(n_keep), clamped)


@contextmanager
def install(
    seams: Seams, method: ResolvedMethod, keep: float, *, seed: int = 0, timer: Timer | None = None
) -> Iterator[Installation]:
    timer = timer or NullTimer()
    counts = plan_counts(seams, method, keep)
    state = CallState()
    generator = torch.Generator().manual_seed(seed)
    inst = Installation(method=method, keep=keep, counts=counts, state=state, generator=generator)
    merge: VisionMerge | None = None
    try:
        if method.stage is not Stage.NONE:
            inst.handles += [
                seams.multimodal.register_forward_pre_hook(capture_image_positions(seams, state), with_kwargs=True),
                seams.language_model.register_forward_pre_hook(llm_entry(state, method.positions), with_kwargs=True),
            ]
        n_keep = counts.n_visual_out
        if method.stage is Stage.PRE_LLM:
            inst.handles += PreLLMSelect(seams, method, n_keep, state, timer, generator).register()
        elif method.stage is Stage.INTRA_LLM:
            inst.handles += IntraLLM(seams, method, n_keep, state, timer, generator).register()
        elif method.stage is Stage.VISION:
            merge = VisionMerge(seams, method, n_keep, state, timer)
            inst.schedule = merge.schedule
            inst.handles += merge.register()
        yield inst
    finally:
        for handle in inst.handles:
            handle.remove()
        inst.handles.clear()
        if merge is not None:
            merge.restore()
