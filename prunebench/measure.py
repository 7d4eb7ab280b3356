"""Timing instrumentation: hooks that mark stage boundaries on the shared `Timer`.

vision  = vision-tower entry -> projector output (vision-stage merges run inside it);
forward = each top-level forward call: the first is the prefill (to the first token's logits),
          the rest are decode steps;
method  = the pruning subroutine only, marked by the stage hooks themselves.
Installed before the method's hooks, so the projector mark comes before a pre-LLM method.

KV-cache bytes are read from the cache object itself (`kv_cache_bytes`): after the prefill forward (a hook
that runs after the forward's timing mark) and when `generate` returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prunebench.seams import Seams
from prunebench.timing import Timer


def kv_cache_bytes(cache: object) -> list[int]:
    """Bytes of the key and value tensors each decoder layer's cache holds now (an empty list for no cache)."""
    def held(t: object) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    return [held(getattr(layer, "keys", None)) + held(getattr(layer, "values", None))
            for layer in getattr(cache, "layers", None) or []]


@contextmanager
def prefill_cache_bytes(model: nn.Module) -> Iterator[dict[str, object]]:
    """Yields {"cache": the generation's cache object, "prefill": its per-layer bytes after the first forward}
    once the first top-level forward has run."""
    seen: dict[str, object] = {}

    def after(module: nn.Module, args: tuple, output: object) -> None:
        cache = getattr(output, "past_key_values", None)
        if "cache" not in seen and cache is not None:
            seen["cache"], seen["prefill"] = cache, kv_cache_bytes(cache)

    handle = model.register_forward_hook(after)
    try:
        yield seen
    finally:
        handle.remove()


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
