"""Model families, one room each: where a family's stages sit (its `Seams`), how its attention inputs are read,
its vision-encoder merge driver, and how its processor loads.

Every room (a module or package in this folder, but the shared `SHARED` modules) declares `FAMILY_ENTRIES`, a
tuple of `Family`; the registry finds the rooms on first use, so adding a family is adding a room (plus a `configs/model/*.yaml`). Rooms keep
transformers' model code out of their import: the class, the seams and the processor load when a model does.
Tiny checkpoints for tests and the embedded default are built by `prunebench.fixtures` (named by `tiny`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunebench.registry import Registry
from prunebench.seams import Seams

# Modules here that are no room: processor loading several rooms share (its import is transformers' processors).
SHARED = frozenset({"processors", "resolution"})


@dataclass(frozen=True)
class Family:
    """One model family: its HF-native class, where its stages sit, and how its processor loads.

    local_processor: for weights=random, a processor built locally for a real-size config and the config
        fields (token ids) that must match its tokenizer (built by the fixtures room).
    load_processor: (path, **kwargs) -> processor of a checkpoint; None = `AutoProcessor.from_pretrained`.
    tiny: "module:function" building this family's tiny random checkpoint (fixtures), `tiny_image_side` the
        image side its tests use.
    input_knob: (processor, image) -> `resolution.Knob`, how the image's resolution sets its visual tokens (the
        input stage, `method=downsample`); None = a fixed resolution (LLaVA-1.5). input_per_call: its setting is a
        processor-call argument (InternVL's tile budget), one value per batch, so the input stage runs at batch 1.
    """

    name: str
    model_class: Callable[[], type[nn.Module]]
    seams: Callable[[nn.Module], Seams]
    local_processor: Callable[[Any], tuple[Any, dict[str, Any]]] | None = None
    load_processor: Callable[..., Any] | None = None
    tiny: str | None = None
    tiny_image_side: int = 48
    input_knob: Callable[[Any, Any], Any] | None = None
    input_per_call: bool = False


def hf_class(name: str) -> Callable[[], type[nn.Module]]:
    """A transformers class by name, imported when asked for."""

    def get() -> type[nn.Module]:
        import transformers

        return getattr(transformers, name)

    return get


def lazy(target: str) -> Callable[..., Any]:
    """'module:function', imported at the first call (a room names its fixtures and drivers this way)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = target
    return call


def _rooms(registry: Registry[Family]) -> None:
    """Every room's `FAMILY_ENTRIES`, imported at the registry's first lookup."""
    for room in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED):
        for entry in getattr(importlib.import_module(f"{__name__}.{room}"), "FAMILY_ENTRIES", ()):
            registry.add(entry.name, entry)


FAMILIES: Registry[Family] = Registry("model family", fill=_rooms)

