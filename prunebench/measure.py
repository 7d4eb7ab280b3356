"""Timing instrumentation: hooks that mark stage boundaries on the shared `Timer`.

vision  = vision-tower entry -> projector output (vision-stage merges run inside it);
forward = each top-level forward call: the first is the prefill (to the first token's logits),
          the rest are decode steps;
method  = the pruning subroutine only, marked by the stage hooks themselves.
Installed before the method's hooks, so the projector mark comes before a pre-LLM method.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from prunebench.models.base import Seams
from prunebench.timing import Timer


@contextmanager
def instrument(model: nn.Module, seams: Seams, timer: Timer) -> Iterator[Timer]:
    handles = [
        seams.vision_tower.register_forward_pre_hook(lambda m, a: timer.start("vision")),
        seams.visual_output.register_forward_hook(lambda m, a, o: timer.stop("vision")),
        model.register_forward_pre_hook(lambda m, a: timer.start("forward")),
        model.register_forward_hook(lambda m, a, o: timer.stop("forward")),
    ]
    try:
        yield timer
    finally:
        for handle in handles:
            handle.remove()
