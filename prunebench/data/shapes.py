"""Built-in offline dataset: generated shape scenes with closed one-word answers.

Every sample is drawn with PIL from a per-sample ``random.Random`` seeded by ``(seed, index)``, so the
dataset is fully deterministic, needs no download, and ``build_shapes(n)`` is a prefix of
``build_shapes(m)`` for ``n < m``. Categories are assigned round-robin, so they are balanced.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

from PIL import Image, ImageDraw

from prunebench.data.items import Item

CATEGORIES: tuple[str, ...] = ("background", "existence", "count", "color", "position")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 50, 170),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
GRID = 3  # scenes live on a GRID x GRID board; column 0 is "left", column GRID-1 is "right"
MAX_SHAPES = 4

Q_BACKGROUND = "What color is the background? Answer with one word."
Q_EXISTENCE = "Is there {article} {color} {shape} in the image? Answer yes or no."
Q_COUNT = "How many shapes are in the image? Answer with a number."
Q_COLOR = "What color is the {shape}? Answer with one word."
Q_POSITION = "Is the {shape} on the left or the right? Answer with one word."

_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip


Sample = Item  # one visual question with its closed ground-truth answer


@dataclass(frozen=True)
class _Shape:
    kind: str
    color: str
    row: int
    col: int


@dataclass(frozen=True)
class _Scene:
    background: str
    shapes: tuple[_Shape, ...]


# ---------------------------------------------------------------------------- questions and answers


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def existence_question(color: str, shape: str) -> str:
    """The existence question for a colour/shape pair."""
    return Q_EXISTENCE.format(article=_article(color), color=color, shape=shape)


def all_questions() -> list[str]:
    """Every question string the generator can produce."""
    questions = [Q_BACKGROUND, Q_COUNT]
    questions += [existence_question(c, s) for c in COLORS for s in SHAPES]
    questions += [Q_COLOR.format(shape=s) for s in SHAPES]
    questions += [Q_POSITION.format(shape=s) for s in SHAPES]
    return questions


def all_answers() -> list[str]:
    """Every answer string the generator can produce."""
    return [*COLORS, "yes", "no", *(str(k) for k in range(1, MAX_SHAPES + 1)), "left", "right"]


def templates_corpus() -> list[str]:
    """Every question and answer string the generator can produce (tokenizer training corpus)."""
    return all_questions() + all_answers()


# ------------------------------------------------------------------------------------------ scoring


def normalize_answer(text: str) -> str:
    """Lowercase first alphanumeric word, with number words mapped to digits ("Two." -> "2")."""
    match = re.search(r"[a-z0-9]+", text.strip().lower())
    if match is None:
        return ""
    word = match.group(0)
    return _NUMBER_WORDS.get(word, word)


def score_answer(prediction: str, answer: str) -> bool:
    """Normalised exact match of the prediction's first word against the closed answer."""
    target = normalize_answer(answer)
    return bool(target) and normalize_answer(prediction) == target


# ----------------------------------------------------------------------------------- scene building


def _cells(rng: random.Random, n: int, exclude: Collection[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in exclude]
    return rng.sample(free, n)


def _scene(rng: random.Random, kinds: list[str], cells: list[tuple[int, int]]) -> _Scene:
    """A scene with the given shape kinds at the given cells, colours differing from the background."""
    background = rng.choice(list(COLORS))
    palette = [c for c in COLORS if c != background]
    shapes = tuple(_Shape(k, rng.choice(palette), r, c) for k, (r, c) in zip(kinds, cells, strict=True))
    return _Scene(background, shapes)


def _random_scene(rng: random.Random, n: int | None = None) -> _Scene:
    n = n if n is not None else rng.randint(1, MAX_SHAPES)
    return _scene(rng, [rng.choice(SHAPES) for _ in range(n)], _cells(rng, n))


def _unique_kind_scene(rng: random.Random, target: str, target_cell: tuple[int, int]) -> _Scene:
    """A scene where ``target`` is the only shape of its kind and sits at ``target_cell``."""
    others = [s for s in SHAPES if s != target]
    n_others = rng.randint(0, MAX_SHAPES - 1)
    kinds = [target] + [rng.choice(others) for _ in range(n_others)]
    return _scene(rng, kinds, [target_cell] + _cells(rng, n_others, exclude={target_cell}))


# -------------------------------------------------------------------------------- question builders

_QA = tuple[_Scene, str, str]


def _round(index: int) -> int:
    """How many samples of the same category precede ``index`` (categories are round-robin)."""
    return index // len(CATEGORIES)


def _make_background(rng: random.Random, index: int) -> _QA:
    scene = _random_scene(rng)
    return scene, Q_BACKGROUND, scene.background


def _make_existence(rng: random.Random, index: int) -> _QA:
    scene = _random_scene(rng)
    if _round(index) % 2 == 0:  # alternate yes / no across existence samples
        shape = rng.choice(scene.shapes)
        return scene, existence_question(shape.color, shape.kind), "yes"
    present = {(s.color, s.kind) for s in scene.shapes}
    absent = [(c, k) for c in COLORS for k in SHAPES if c != scene.background and (c, k) not in present]
    color, kind = rng.choice(absent)
    return scene, existence_question(color, kind), "no"


def _make_count(rng: random.Random, index: int) -> _QA:
    n = 1 + _round(index) % MAX_SHAPES  # cycle 1..MAX_SHAPES across count samples
    return _random_scene(rng, n), Q_COUNT, str(n)


def _make_color(rng: random.Random, index: int) -> _QA:
    target = rng.choice(SHAPES)
    scene = _unique_kind_scene(rng, target, _cells(rng, 1)[0])
    return scene, Q_COLOR.format(shape=target), scene.shapes[0].color


def _make_position(rng: random.Random, index: int) -> _QA:
    target = rng.choice(SHAPES)
    side = ("left", "right")[_round(index) % 2]  # alternate across position samples
    cell = (rng.randrange(GRID), 0 if side == "left" else GRID - 1)
    return _unique_kind_scene(rng, target, cell), Q_POSITION.format(shape=target), side


_BUILDERS: dict[str, Callable[[random.Random, int], _QA]] = {
    "background": _make_background,
    "existence": _make_existence,
    "count": _make_count,
    "color": _make_color,
    "position": _make_position,
}


# ------------------------------------------------------------------------------------------ drawing


def _draw_shape(draw: ImageDraw.ImageDraw, shape: _Shape, cell: float) -> None:
    cx, cy = (shape.col + 0.5) * cell, (shape.row + 0.5) * cell
    r = 0.34 * cell
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def render_scene(scene: _Scene, image_size: int) -> Image.Image:
    """Draw a scene as an RGB image of ``image_size`` x ``image_size`` pixels."""
    image = Image.new("RGB", (image_size, image_size), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape, image_size / GRID)
    return image


# --------------------------------------------------------------------------------------- public API


def make_sample(index: int, *, seed: int = 0, image_size: int = 96) -> Sample:
    """The ``index``-th sample of the dataset with this seed (independent of the dataset length)."""
    category = CATEGORIES[index % len(CATEGORIES)]
    rng = random.Random(f"prunebench-shapes:{seed}:{index}")
    scene, question, answer = _BUILDERS[category](rng, index)
    return Sample(index, render_scene(scene, image_size), question, answer, category)


def build_shapes(n: int = 60, *, seed: int = 0, image_size: int = 96) -> list[Sample]:
    """``n`` deterministic samples, categories balanced round-robin."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_sample(i, seed=seed, image_size=image_size) for i in range(n)]
