"""Benchmarks the runner can drive. A dataset yields items (image + question + closed answer)
and scores predictions; it knows nothing about models or methods."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prunebench.data.items import Item
from prunebench.registry import Registry


@dataclass(frozen=True)
class Scored:
    score: float  # main metric, 0-100
    metrics: dict[str, float]  # per category, 0-100
    metric_name: str


class Dataset(Protocol):
    name: str
    max_new_tokens: int

    def items(self) -> list[Item]: ...

    def is_correct(self, prediction: str, item: Item) -> bool: ...

    def score(self, rows: Iterable[Mapping[str, Any]]) -> Scored: ...


def accuracy(rows: Iterable[Mapping[str, Any]]) -> Scored:
    """Exact-match accuracy overall and per category, over rows with a `correct` field."""
    per: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        if row.get("error") is None:
            per[row["category"]].append(bool(row["correct"]))
    everything = [c for v in per.values() for c in v]
    overall = 100.0 * sum(everything) / len(everything) if everything else float("nan")
    metrics = {k: 100.0 * sum(v) / len(v) for k, v in sorted(per.items())}
    return Scored(score=overall, metrics=metrics, metric_name="accuracy")


class Shapes:
    """Built-in offline set: generated scenes, closed one-word answers, exact-match scoring."""

    def __init__(self, name: str, n: int = 100, seed: int = 0, image_size: int = 96, max_new_tokens: int = 4,
                 **_: Any) -> None:
        self.name, self.n, self.seed, self.image_size = name, n, seed, image_size
        self.max_new_tokens = max_new_tokens
        self._items: list[Item] | None = None

    def items(self) -> list[Item]:
        """The items, generated on first use (a fresh list each call; the items are shared and immutable)."""
        if self._items is None:
            self._items = self._build()
        return list(self._items)

    def _build(self) -> list[Item]:
        from prunebench.data.shapes import build_shapes

        return build_shapes(self.n, seed=self.seed, image_size=self.image_size)

    def is_correct(self, prediction: str, item: Item) -> bool:
        from prunebench.data.shapes import score_answer

        return score_answer(prediction, item.answer)

    def score(self, rows: Iterable[Mapping[str, Any]]) -> Scored:
        return accuracy(rows)


class ShapesVideo(Shapes):
    """Built-in offline video set (`data/shapes_video.py`), exact-match scoring."""

    def __init__(self, name: str, n: int = 30, seed: int = 0, image_size: int = 96, max_new_tokens: int = 4,
                 source_frames: int = 96, num_frames: int = 64, **_: Any) -> None:
        super().__init__(name, n=n, seed=seed, image_size=image_size, max_new_tokens=max_new_tokens)
        self.source_frames, self.num_frames = source_frames, num_frames

    def _build(self) -> list[Item]:
        from prunebench.data.shapes_video import build_shapes_video

        return build_shapes_video(self.n, seed=self.seed, image_size=self.image_size,
                                  source_frames=self.source_frames, num_frames=self.num_frames)


class Probe(Shapes):
    """The probe suite (`data/probe.py`): six question families, exact-match scoring per family.

    `families` (default all) picks the families built; items are round-robin over them, so they
    are balanced. The record's `metrics` carry accuracy per family.
    """

    def __init__(self, name: str, n: int = 600, seed: int = 0, image_size: int = 96, max_new_tokens: int = 4,
                 families: list[str] | None = None, **_: Any) -> None:
        from prunebench.data.probe import check_families

        super().__init__(name, n=n, seed=seed, image_size=image_size, max_new_tokens=max_new_tokens)
        self.families = check_families(list(families) if families is not None else None)

    def _build(self) -> list[Item]:
        from prunebench.data.probe import build_probe

        return build_probe(self.n, seed=self.seed, image_size=self.image_size, families=self.families)


DATASET_KINDS: Registry[Callable[..., Dataset]] = Registry("dataset kind")
DATASET_KINDS.add("shapes", Shapes)
DATASET_KINDS.add("shapes_video", ShapesVideo)
DATASET_KINDS.add("probe", Probe)


def build_dataset(cfg: Mapping[str, Any]) -> Dataset:
    """The dataset of a config; built once per process per config (the jobs of a sweep share it: items are
    immutable and every consumer slices its own list)."""
    params = dict(cfg)
    key = json.dumps(params, sort_keys=True, default=str)
    if key not in _BUILT:
        if len(_BUILT) >= 4:  # a few suites at a time, the oldest dropped
            _BUILT.pop(next(iter(_BUILT)))
        kind = DATASET_KINDS.get(str(params.pop("kind")))
        _BUILT[key] = kind(**params)
    return _BUILT[key]


_BUILT: dict[str, Dataset] = {}
