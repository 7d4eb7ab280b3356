"""Install a pruning method at its stage on a loaded model, reversibly.

    with install(seams, method, keep=0.111, seed=0) as inst:
        model.generate(**inputs)
        inst.counts  # visual tokens in / out of the last prompt

Everything is a hook or a per-instance class swap on *this* model; leaving the `with` block
removes every hook and restores every class, so the model is bit-for-bit the one before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from prunebench.methods.base import Positions, ResolvedMethod, Stage, n_keep_for
from prunebench.models.base import Seams
from prunebench.stages.llm import IntraLLM, capture_image_positions, llm_entry
from prunebench.stages.state import CallState, TokenCounts
from prunebench.stages.vision import PreLLMSelect, VisionMerge
from prunebench.stages.vision_preproj import PROJECTOR_INPUT, PreProjectorSelect
from prunebench.timing import NullTimer, Timer


@dataclass
class Installation:
    method: ResolvedMethod
    keep: float
    positions: Positions  # the policy in force (M-RoPE families keep original positions)
    state: CallState
    generator: torch.Generator
    schedule: list[int] | None = None  # per encoder layer merges (vision stage)
    notes: list[str] = field(default_factory=list)
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)

    @property
    def counts(self) -> TokenCounts:
        """Visual tokens of the last prompt, as measured by the hooks."""
        return self.state.counts

    def reseed(self, seed: int) -> None:
        """Fix the random stream of stochastic methods, e.g. per sample: seed + sample index."""
        self.generator.manual_seed(seed)


def effective_positions(seams: Seams, method: ResolvedMethod) -> tuple[Positions, list[str]]:
    if seams.mrope and method.positions is Positions.CONTIGUOUS and method.stage is not Stage.NONE:
        return Positions.ORIGINAL, [
            f"{seams.family}: multi-axis RoPE has no contiguous renumbering; original position ids kept "
            "(as UniPruneBench does for Qwen)"
        ]
    return method.positions, []


def _pre_llm(seams: Seams, method: ResolvedMethod, inst: Installation, timer: Timer) -> PreLLMSelect:
    """The pre-LLM seam: on the projector input for methods in encoder feature space when the
    family's projector rows allow it, else on the projector output (noted)."""
    args = (seams, method, inst.keep, inst.state)
    if PROJECTOR_INPUT in method.spec.needs:
        if seams.projector_rows:
            return PreProjectorSelect(*args, timer, inst.generator)
        inst.notes.append(f"{seams.family}: the projector input is not row-aligned with its output; "
                          f"{method.name} merges after the projector, in LLM space")
    return PreLLMSelect(*args, timer, inst.generator)


@contextmanager
def install(
    seams: Seams, method: ResolvedMethod, keep: float, *, seed: int = 0, timer: Timer | None = None
) -> Iterator[Installation]:
    timer = timer or NullTimer()
    n_keep_for(keep, 1)  # validates keep
    positions, notes = effective_positions(seams, method)
    state = CallState()
    generator = torch.Generator().manual_seed(seed)
    inst = Installation(method=method, keep=keep, positions=positions, state=state, generator=generator,
                        notes=notes)
    merge: VisionMerge | None = None
    try:
        inst.handles.append(
            seams.multimodal.register_forward_pre_hook(capture_image_positions(seams, state), with_kwargs=True))
        if method.stage is not Stage.NONE:
            inst.handles.append(
                seams.language_model.register_forward_pre_hook(llm_entry(state, positions), with_kwargs=True))
        if method.stage is Stage.PRE_LLM:
            inst.handles += _pre_llm(seams, method, inst, timer).register()
        elif method.stage is Stage.INTRA_LLM:
            inst.handles += IntraLLM(seams, method, keep, positions, state, timer, generator).register()
        elif method.stage is Stage.VISION:
            merge = (seams.vision_driver or VisionMerge)(seams, method, keep, state, timer)
            inst.schedule = merge.schedule
            inst.handles += merge.register()
        yield inst
    finally:
        for handle in inst.handles:
            handle.remove()
        inst.handles.clear()
        if merge is not None:
            merge.restore()
