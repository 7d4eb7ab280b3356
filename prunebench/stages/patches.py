"""Per-instance, reversible patches of a loaded model (ToMe `tome/patch/timm.py` style): a method shadowed on one
module, an attribute overridden on one module, encoder layers swapped to their merging subclass. Each is undone
by `remove()` / `restore()`, so the model is bit-for-bit the same after a run."""

from __future__ import annotations

import functools

import torch


class MethodWrap:
    """Shadow `owner.name` with a per-instance wrapper that calls `before(owner, args, kwargs)` and
    `after(owner, args, kwargs, output)` around it; `remove()` restores the class's method (the
    instance attribute is deleted)."""

    def __init__(self, owner: torch.nn.Module, name: str, after: object = None, before: object = None) -> None:
        self.owner, self.name = owner, name
        original = getattr(owner, name)

        @functools.wraps(original)  # keeps the signature: `generate` inspects it to route kwargs
        def wrapped(*args: object, **kwargs: object) -> object:
            if before is not None:
                before(owner, args, kwargs)
            output = original(*args, **kwargs)
            if after is not None:
                after(owner, args, kwargs, output)
            return output

        setattr(owner, name, wrapped)

    def remove(self) -> None:
        if self.name in vars(self.owner):
            delattr(self.owner, self.name)


class AttrOverride(MethodWrap):
    """Shadow `owner.name` with `value` on this instance only; `remove()` restores the class's."""

    def __init__(self, owner: torch.nn.Module, name: str, value: object) -> None:
        self.owner, self.name = owner, name
        setattr(owner, name, value)


class ClassSwaps:
    """Per-instance class swaps of encoder layers to their merging subclass (ToMe-style), with the
    merge step attached as `layer._pb_merge`; `restore()` puts every class back."""

    def __init__(self) -> None:
        self._swapped: list[tuple[torch.nn.Module, type]] = []

    def swap(self, layer: torch.nn.Module, cls: type, step: object) -> None:
        self._swapped.append((layer, type(layer)))
        layer.__class__ = cls
        layer._pb_merge = step

    def restore(self) -> None:
        for layer, cls in self._swapped:
            layer.__class__ = cls
            del layer._pb_merge
        self._swapped.clear()
