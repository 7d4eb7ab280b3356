"""The input stage: a method acting on the images before the processor (`Stage.INPUT`, `method=downsample`).

It installs no hook on the model: `generation.batch_inputs` asks the installation's `InputStage` how to prepare a
batch's images, processes them so, and caches the result under the preparation (`Prepared.key`), so a prepared
batch is never served to another method, or an unprepared one to this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prunebench.errors import UserError
from prunebench.methods.base import ResolvedMethod, n_keep_for
from prunebench.seams import Seams


def refusal(family: str, knob: Any, method: ResolvedMethod) -> str | None:
    """Why the input-stage method cannot run on the family (one line: it has no resolution knob), or None."""
    if knob is not None:
        return None
    return (f"{method.name}: the {family} family has a fixed input resolution (its processor always gives the same "
            f"visual tokens): not supported on the {family} family; use method=pooling_pre for a pooling baseline")


def refuse_outside_builtin(method: ResolvedMethod, backend: str) -> None:
    """The VLMEvalKit and lmms-eval backends build their own inputs: an input-stage method would not act there."""
    if method.spec.kind == "input":
        raise UserError(f"{method.name} prepares the images before the processor in the built-in runner only; "
                        f"the {backend} backend builds its own inputs: run it with the built-in backend")


@dataclass(frozen=True)
class Prepared:
    """A batch's images as the processor gets them.

    images: per item, its image (resized or its own); kwargs: processor call arguments (one setting per call);
    key: per item its setting (None: unchanged), part of the input cache's key;
    unresized: per item the visual tokens its unchanged image gives (N); expected: what the prepared one gives.
    """

    images: list[Any]
    kwargs: dict[str, Any]
    key: tuple[Any, ...]
    unresized: list[int]
    expected: list[int]


class InputStage:
    """Picks each image's knob setting for the run's keep (the method's function) and applies it."""

    def __init__(self, seams: Seams, method: ResolvedMethod, keep: float, inst: Any) -> None:
        why = refusal(seams.family, seams.input_knob, method)
        if why is not None:
            raise UserError(why)
        self.family, self.method, self.keep, self.knob = seams.family, method, keep, seams.input_knob
        self.inst = inst  # its `flags` (the runner gathers every installation's into the record)

    def prepare(self, processor: Any, items: list[Any]) -> Prepared | None:
        """The batch's preparation, or None when no image changes (keep=1.0, or none can give fewer tokens): the
        unresized inputs, exactly."""
        if self.keep >= 1.0:
            return None
        if any(item.frames for item in items):
            raise UserError(f"{self.method.name} resizes images; video samples are not supported")
        images, calls, key, unresized, expected = [], [], [], [], []
        resample = str(self.method.params["resample"])
        for item in items:
            knob = self.knob(processor, item.image)
            n_in = knob.tokens(knob.high)
            n_keep, _ = n_keep_for(self.keep, n_in)
            setting = int(self.method.spec.fn(knob.tokens, knob.low, knob.high, n_keep, **self.method.params))
            if knob.tokens(setting) > n_keep and knob.tokens(knob.low) > n_keep:
                self._flag(f"budget unreachable: {self.method.name} on {self.family}: the smallest {knob.what} "
                           f"gives more than round(keep*N) visual tokens for some images (their floor is kept)")
            image, call = knob.apply(setting, resample)
            images.append(image)
            calls.append(call)
            key.append(None if setting == knob.high else (self.method.name, resample, knob.what, setting))
            unresized.append(n_in)
            expected.append(knob.tokens(setting))
        if all(k is None for k in key):
            return None
        if len({tuple(sorted(c.items())) for c in calls}) > 1:
            raise UserError(f"{self.method.name} on {self.family} sets the processor's {knob.what} per image, one "
                            f"value per call; the images of this batch need different ones: use batch_size=1")
        return Prepared(images, calls[0], tuple(key), unresized, expected)

    def _flag(self, line: str) -> None:
        if line not in self.inst.flags:
            self.inst.flags.append(line)
