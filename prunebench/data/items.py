"""What every dataset yields: one question about an image or a video, with its closed answer."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Item:
    """One question with a closed answer, about an image or (when `frames` is set) a video."""

    index: int
    image: Image.Image
    question: str
    answer: str
    category: str
    frames: tuple[Image.Image, ...] | None = None
