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
from typing import Any

import torch

from prunebench.errors import UserError
from prunebench.methods.base import Positions, ResolvedMethod, Stage, n_keep_for
from prunebench.methods.compose import PlannedStage, plan_stages
from prunebench.seams import Seams
from prunebench.stages.inputs import InputStage
from prunebench.stages.llm import IntraLLM, capture_image_positions, llm_entry
from prunebench.stages.state import CallState, TokenCounts
from prunebench.stages.vision import PreLLMSelect, VisionMerge
from prunebench.stages.vision_mustdrop import MustDropVision
from prunebench.stages.vision_preproj import PROJECTOR_INPUT, PreProjectorSelect
from prunebench.timing import NullTimer, Timer

# Vision-encoder stages an intra-LLM method installs with its own LLM stages (`MethodSpec.vision_stage`).
VISION_STAGES = {"mustdrop": MustDropVision}


@dataclass
class Installation:
    method: ResolvedMethod
    keep: float
    positions: Positions  # the policy in force (M-RoPE families keep original positions); pipelines: the last stage's
    state: CallState
    generator: torch.Generator
    schedule: list[int] | None = None  # per encoder layer merges (vision stage)
    notes: list[str] = field(default_factory=list)
    # results the run cannot be read as asked, each one line (e.g. `budget unreachable: ...`); filled once the
    # stage knows its token count (an intra-LLM stage: on the first prompt)
    flags: list[str] = field(default_factory=list)
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    stages: list[PlannedStage] = field(default_factory=list)  # `method=compose`: its stages, in order
    # the FLOPs counted under this installation, per signature of shapes and counts (`generation.flops_signature`)
    flops_counted: dict[str, dict[str, Any]] = field(default_factory=dict)
    prunes: bool = False  # some stage keeps less than all: prediction rows say which tokens stayed (`kept.py`)
    # an input-stage method (`method=downsample`): how `generation.batch_inputs` prepares the images; None: as given
    inputs: InputStage | None = None

    @property
    def counts(self) -> TokenCounts:
        """Visual tokens of the last prompt, as measured by the hooks."""
        return self.state.counts

    @property
    def stage_counts(self) -> list[dict[str, Any]]:
        """Pipelines: per stage of the last prompt, its method, keep and visual tokens in / out."""
        out = []
        for stage in self.stages:
            c = self.state.stage_counts.get("intra" if stage.method.stage is Stage.INTRA_LLM else "entry")
            out.append({"method": stage.method.name, "keep": stage.keep,
                        "n_visual_in": None if c is None else c.n_visual_in,
                        "n_visual_out": None if c is None else c.n_visual_out,
                        "clamped_to_one": None if c is None else c.clamped})
        return out

    def reseed(self, seed: int) -> None:
        """Fix the random stream of stochastic methods, e.g. per sample: seed + sample index."""
        self.reseed_rows([seed])

    def reseed_rows(self, seeds: list[int]) -> None:
        """The seeds of a batch's samples, one per row: each row's picks restart from its own seed, so a sample
        draws the same stream alone or in a batch."""
        self.generator.manual_seed(seeds[0])
        self.state.row_seeds = list(seeds)


# Signals read at the text after ONE prompt's last visual token (SparseVLM's raters, MustDrop's text rows): in a
# left-padded batch that text starts at a different row in every sample.
_ONE_PROMPT_SIGNALS = frozenset({"raters", "rater_attention"})


def batch_refusal(method: ResolvedMethod) -> str | None:
    """Why the method cannot run several samples per forward (one line), or None when it batches."""
    if method.stage is Stage.PIPELINE:
        return "compose pipelines report per-stage counts per prompt and run at batch size 1"
    if not _ONE_PROMPT_SIGNALS.isdisjoint(method.spec.needs):
        return (f"{method.name} rates the visual tokens with the text rows after one prompt's last visual token, "
                f"which start at a different row in every sample of a left-padded batch")
    return None


def effective_positions(seams: Seams, method: ResolvedMethod) -> tuple[Positions, list[str]]:
    if seams.mrope and method.positions is Positions.CONTIGUOUS and method.stage not in (Stage.NONE, Stage.INPUT):
        return Positions.ORIGINAL, [
            f"{seams.family}: multi-axis RoPE has no contiguous renumbering; original position ids kept "
            "(as UniPruneBench does for Qwen)"
        ]
    return method.positions, []


def planned_stages(method: ResolvedMethod, keep: float) -> list[PlannedStage]:
    """The stages a method installs: a pipeline's own list, one stage otherwise, none for vanilla."""
    if method.stage is Stage.PIPELINE:
        return plan_stages(method.params["stages"], keep)
    return [] if method.stage is Stage.NONE else [PlannedStage(method, keep)]


def _pre_llm(seams: Seams, method: ResolvedMethod, keep: float, inst: Installation, timer: Timer) -> PreLLMSelect:
    """The pre-LLM seam: on the projector input for methods in encoder feature space when the
    family's projector rows allow it, else on the projector output (noted)."""
    args = (seams, method, keep, inst.state)
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
    stages = planned_stages(method, keep)
    policies = [effective_positions(seams, stage.method) for stage in stages]
    notes = list(dict.fromkeys(n for _, stage_notes in policies for n in stage_notes))
    state = CallState()
    generator = torch.Generator().manual_seed(seed)
    positions = policies[-1][0] if policies else method.positions
    inst = Installation(method=method, keep=keep, positions=positions, state=state, generator=generator,
                        notes=notes, stages=stages if method.stage is Stage.PIPELINE else [],
                        prunes=any(stage.keep < 1.0 for stage in stages))
    merges: list[Any] = []
    try:
        # shared hooks, once: where the visual tokens are, and the LLM entry applying earlier decisions
        inst.handles.append(
            seams.multimodal.register_forward_pre_hook(capture_image_positions(seams, state), with_kwargs=True))
        model_stages = [stage for stage in stages if stage.method.stage is not Stage.INPUT]  # hooks on the model
        if model_stages:
            inst.handles.append(
                seams.language_model.register_forward_pre_hook(llm_entry(state, policies[0][0]), with_kwargs=True))
        for stage, (positions, _) in zip(stages, policies, strict=True):
            inst.handles += _install_stage(seams, stage, positions, inst, timer, merges)
        if seams.deepstack is not None and any(stage.keep < 1.0 for stage in model_stages):  # injected visual features
            # follow the rows the stages leave
            inst.handles += seams.deepstack.follow(seams.language_model, state)
            inst.notes.append(seams.deepstack.note)
        yield inst
    finally:
        for handle in inst.handles:
            handle.remove()
        inst.handles.clear()
        for merge in merges:
            merge.restore()


def _install_stage(seams: Seams, stage: PlannedStage, positions: Positions, inst: Installation, timer: Timer,
                   merges: list[Any]) -> list[Any]:
    """One stage's own handler (the shared hooks are already in place)."""
    method, keep, state = stage.method, stage.keep, inst.state
    if method.stage is Stage.INPUT:  # nothing on the model: the images are prepared before the processor
        inst.inputs = InputStage(seams, method, keep, inst)
        return []
    if method.stage is Stage.PRE_LLM:
        return _pre_llm(seams, method, keep, inst, timer).register()
    if method.stage is Stage.INTRA_LLM:
        handles = _own_vision_stage(seams, stage, inst, timer, merges)
        intra = IntraLLM(seams, method, keep, positions, state, timer, inst.generator)
        intra.flags = inst.flags  # the stage adds `budget unreachable` once it sees its token count
        if method.spec.layer_for_keep is not None:  # the record says which operating point ran
            inst.notes.append(f"{method.name}: layer K={intra.k} of {len(seams.decoder_layers)} for keep={keep}")
        return handles + intra.register()
    merge = (seams.vision_driver or VisionMerge)(seams, method, keep, state, timer)
    merges.append(merge)
    inst.schedule = merge.schedule
    inst.notes += getattr(merge, "notes", [])
    return merge.register()


def _own_vision_stage(seams: Seams, stage: PlannedStage, inst: Installation, timer: Timer,
                      merges: list[Any]) -> list[Any]:
    """An intra-LLM method's own vision-encoder stage (MustDrop), when it acts in this run."""
    method = stage.method
    if not method.spec.runs_vision_stage(stage.keep, method.params):
        return []
    if len(inst.stages) > 1:  # a pipeline's other stage would hand on visual tokens too
        raise UserError(f"compose: {method.name} brings its own vision-encoder stages and cannot follow another "
                        f"stage; set its params.vision_stages=false, or run it alone")
    handler = VISION_STAGES[method.spec.vision_stage](seams, method, stage.keep, inst.state, timer)
    merges.append(handler)
    return handler.register()
