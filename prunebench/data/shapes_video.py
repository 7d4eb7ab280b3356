"""Built-in offline video set: a shape crossing the frame, sampled uniformly to `num_frames`.

Each video has `source_frames` frames of one shape moving horizontally across a plain
background (plus, every other video, a static distractor). Questions have closed one-word
answers: the direction of motion (needs several frames), which shape moves (needs detail), and
the background colour (the coarse control). Frames are sampled uniformly, 64 by default as in
EvoPrune's video setting (papers/evoprune.txt §4.2).
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

from prunebench.data.items import Item
from prunebench.data.shapes import COLORS, SHAPES

Q_DIRECTION = "Does the {color} {shape} move to the left or to the right? Answer with one word."
Q_WHICH = "Which shape moves in the video? Answer with one word."
Q_BACKGROUND = "What color is the background? Answer with one word."
CATEGORIES = ("direction", "which", "background")


def sample_frames(n_source: int, n: int) -> list[int]:
    """Uniform frame indices, first and last included (as LLaVA-Video's uniform sampling)."""
    if n >= n_source:
        return list(range(n_source))
    return [int(round(x)) for x in np.linspace(0, n_source - 1, n)]


def _draw(draw: ImageDraw.ImageDraw, kind: str, color: str, cx: float, cy: float, r: float) -> None:
    fill = COLORS[color]
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def make_video(index: int, *, seed: int = 0, image_size: int = 96, source_frames: int = 96,
               num_frames: int = 64) -> Item:
    """The `index`-th video item of this seed: frames sampled uniformly from `source_frames`."""
    rng = random.Random(f"prunebench-shapes-video:{seed}:{index}")
    background = rng.choice(list(COLORS))
    color = rng.choice([c for c in COLORS if c != background])
    kind = rng.choice(SHAPES)
    rightwards = index % 2 == 0
    distractor = None
    if index % 4 >= 2:
        distractor = (rng.choice([s for s in SHAPES if s != kind]), rng.choice([c for c in COLORS if c != background]))
    r = image_size * 0.12
    frames = []
    for f in sample_frames(source_frames, num_frames):
        t = f / max(source_frames - 1, 1)
        x = r + (image_size - 2 * r) * (t if rightwards else 1 - t)
        image = Image.new("RGB", (image_size, image_size), COLORS[background])
        draw = ImageDraw.Draw(image)
        if distractor is not None:
            _draw(draw, *distractor, image_size / 2, image_size * 0.8, r * 0.8)
        _draw(draw, kind, color, x, image_size * 0.35, r)
        frames.append(image)
    category = CATEGORIES[index % len(CATEGORIES)]
    question, answer = {
        "direction": (Q_DIRECTION.format(color=color, shape=kind), "right" if rightwards else "left"),
        "which": (Q_WHICH, kind),
        "background": (Q_BACKGROUND, background),
    }[category]
    return Item(index, frames[0], question, answer, category, frames=tuple(frames))


def build_shapes_video(n: int = 30, *, seed: int = 0, image_size: int = 96, source_frames: int = 96,
                       num_frames: int = 64) -> list[Item]:
    return [make_video(i, seed=seed, image_size=image_size, source_frames=source_frames, num_frames=num_frames)
            for i in range(n)]
