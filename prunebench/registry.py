"""A small name -> object registry with helpful errors (after lm-eval-harness `api/registry.py`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prunebench.errors import unknown_choice

T = TypeVar("T")


class Registry(Generic[T]):
    """`fill(registry)`, when given, adds the entries at the first lookup (a registry whose entries live in
    modules imported only when asked for, e.g. the model families)."""

    def __init__(self, kind: str, fill: Callable[[Registry[T]], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._fill = fill

    def _filled(self) -> dict[str, T]:
        if self._fill is not None:
            fill, self._fill = self._fill, None
            fill(self)
        return self._items

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._filled()[name]
        except KeyError:
            raise unknown_choice(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        return sorted(self._filled())

    def __contains__(self, name: object) -> bool:
        return name in self._filled()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
