"""The probe: a generated offline suite whose answers depend on specific image regions.

Six question families with closed answers, each in the style of a real benchmark:

=============  =====================  ==========================================================
family         style                  question / answer
=============  =====================  ==========================================================
background     coarse control         global background colour -> colour word
existence      POPE (yes/no)          "Is there a red circle ...?" -> yes / no (balanced)
attribute      MMBench (MCQ letters)  colour of the unique <shape>, 4 options -> A/B/C/D
count          counting               number of shapes, 1..4 -> digit
spatial        relation               is <shape a> left or right of <shape b> -> left / right
reading        OCR-like               a large seven-segment digit -> 0..9
=============  =====================  ==========================================================

Scenes are 96x96 px by default: a 3x3 board of 32 px cells, i.e. 4x4 patches of 8 px per cell for
the tiny LLaVA (144 visual tokens). An object fills most of one cell, so a question about it depends
on ~16 of the 144 tokens while the background colour is visible in almost every token.

Every item is drawn from a ``random.Random`` seeded by ``(split, seed, index)``: deterministic, a
prefix of any longer build, and the ``train`` split never meets the ``test`` split. Families are
round-robin, so they are balanced. :func:`patch_labels` gives the dense per-patch labels the
training script supervises the vision encoder with.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from prunebench.data.items import Item
from prunebench.errors import UserError

FAMILIES: tuple[str, ...] = ("background", "existence", "attribute", "count", "spatial", "reading")
COARSE: tuple[str, ...] = ("background",)  # families answerable from any part of the image
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
GRID = 3  # cells per side
MAX_COUNT = 4
LETTERS = "ABCD"

Q_BACKGROUND = "What color is the background? Answer with one word."
Q_EXISTENCE = "Is there a {color} {shape} in the image? Answer yes or no."
Q_ATTRIBUTE = "What color is the {shape}?\n{options}\nAnswer with the option's letter from the given choices directly."
Q_COUNT = "How many shapes are in the image? Answer with a number."
Q_SPATIAL = "Is the {a} to the left or to the right of the {b}? Answer with one word."
Q_READING = "What number is written in the image? Answer with a number."

# Seven-segment glyphs: segments a (top), b (top right), c (bottom right), d (bottom),
# e (bottom left), f (top left), g (middle).
SEGMENTS: dict[str, str] = {
    "0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc",
    "5": "afgcd", "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg",
}  # fmt: skip


@dataclass(frozen=True)
class Obj:
    """One object on the board: a shape or a digit (``kind`` is the shape name or ``digit``)."""

    kind: str
    color: str
    row: int
    col: int
    digit: str | None = None


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]


QA = tuple[Scene, str, str]


# ------------------------------------------------------------------------------------- scene helpers


def _cells(rng: random.Random, n: int, exclude: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in exclude]
    return rng.sample(free, n)


def _palette(rng: random.Random) -> tuple[str, list[str]]:
    background = rng.choice(list(COLORS))
    return background, [c for c in COLORS if c != background]


def _shapes(rng: random.Random, palette: list[str], kinds: Sequence[str],
            cells: Sequence[tuple[int, int]]) -> tuple[Obj, ...]:
    return tuple(Obj(k, rng.choice(palette), r, c) for k, (r, c) in zip(kinds, cells, strict=True))


def random_scene(rng: random.Random, n: int | None = None, max_count: int = MAX_COUNT) -> Scene:
    """1..max_count random shapes on a random background (training and the count family)."""
    background, palette = _palette(rng)
    n = n if n is not None else rng.randint(1, max_count)
    return Scene(background, _shapes(rng, palette, [rng.choice(SHAPES) for _ in range(n)], _cells(rng, n)))


# -------------------------------------------------------------------------------- question builders


def _round(index: int) -> int:
    """How many items of the same family precede ``index`` (families are round-robin)."""
    return index // len(FAMILIES)


def make_background(rng: random.Random, index: int) -> QA:
    scene = random_scene(rng)
    return scene, Q_BACKGROUND, scene.background


def make_existence(rng: random.Random, index: int) -> QA:
    scene = random_scene(rng)
    if _round(index) % 2 == 0:  # alternate yes / no
        obj = rng.choice(scene.objects)
        return scene, Q_EXISTENCE.format(color=obj.color, shape=obj.kind), "yes"
    present = {(o.color, o.kind) for o in scene.objects}
    # POPE-style hard negatives: the colour or the shape of the absent pair is in the scene
    near = [(c, k) for c in COLORS for k in SHAPES if c != scene.background and (c, k) not in present
            and any(c == o.color or k == o.kind for o in scene.objects)]
    color, kind = rng.choice(near)
    return scene, Q_EXISTENCE.format(color=color, shape=kind), "no"


def make_attribute(rng: random.Random, index: int) -> QA:
    background, palette = _palette(rng)
    target = rng.choice(SHAPES)
    others = [s for s in SHAPES if s != target]
    n_others = rng.randint(0, MAX_COUNT - 1)
    kinds = [target] + [rng.choice(others) for _ in range(n_others)]
    scene = Scene(background, _shapes(rng, palette, kinds, _cells(rng, 1 + n_others)))
    color = scene.objects[0].color
    options = rng.sample([c for c in COLORS if c != color], len(LETTERS) - 1)
    letter = LETTERS[_round(index) % len(LETTERS)]  # the right letter cycles A, B, C, D
    options.insert(LETTERS.index(letter), color)
    listed = "\n".join(f"{L}. {c}" for L, c in zip(LETTERS, options, strict=True))
    return scene, Q_ATTRIBUTE.format(shape=target, options=listed), letter


def make_count(rng: random.Random, index: int) -> QA:
    n = 1 + _round(index) % MAX_COUNT  # cycle 1..MAX_COUNT
    return random_scene(rng, n), Q_COUNT, str(n)


def make_spatial(rng: random.Random, index: int) -> QA:
    background, palette = _palette(rng)
    a, b, third = rng.sample(SHAPES, 3)
    col_a, col_b = rng.sample(range(GRID), 2)
    cells = [(rng.randrange(GRID), col_a), (rng.randrange(GRID), col_b)]
    kinds = [a, b]
    if rng.random() < 0.5:  # a distractor of the third kind
        kinds.append(third)
        cells += _cells(rng, 1, exclude=cells)
    scene = Scene(background, _shapes(rng, palette, kinds, cells))
    return scene, Q_SPATIAL.format(a=a, b=b), "left" if col_a < col_b else "right"


def make_reading(rng: random.Random, index: int) -> QA:
    background, palette = _palette(rng)
    digit = str(_round(index) % 10)
    cells = _cells(rng, 1 + rng.randint(0, 2))
    digit_obj = Obj("digit", rng.choice(palette), *cells[0], digit=digit)
    shapes = _shapes(rng, palette, [rng.choice(SHAPES) for _ in cells[1:]], cells[1:])
    return Scene(background, (digit_obj, *shapes)), Q_READING, digit


BUILDERS: dict[str, Callable[[random.Random, int], QA]] = {
    "background": make_background,
    "existence": make_existence,
    "attribute": make_attribute,
    "count": make_count,
    "spatial": make_spatial,
    "reading": make_reading,
}


# ------------------------------------------------------------------------------------------ drawing


def _seven_segment(draw: ImageDraw.ImageDraw, obj: Obj, x0: float, y0: float, cell: float) -> None:
    w, h, t = 0.56 * cell, 0.84 * cell, max(2.0, 0.15 * cell)  # glyph width, height, stroke
    left, top = x0 + (cell - w) / 2, y0 + (cell - h) / 2
    right, bottom, mid = left + w, top + h, top + h / 2
    boxes = {
        "a": (left, top, right, top + t), "g": (left, mid - t / 2, right, mid + t / 2),
        "d": (left, bottom - t, right, bottom), "f": (left, top, left + t, mid),
        "b": (right - t, top, right, mid), "e": (left, mid, left + t, bottom), "c": (right - t, mid, right, bottom),
    }  # fmt: skip
    for seg in SEGMENTS[obj.digit or "8"]:
        draw.rectangle(boxes[seg], fill=COLORS[obj.color])


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, cell: float) -> None:
    x0, y0 = obj.col * cell, obj.row * cell
    if obj.kind == "digit":
        _seven_segment(draw, obj, x0, y0, cell)
        return
    cx, cy, r = x0 + cell / 2, y0 + cell / 2, 0.38 * cell
    fill = COLORS[obj.color]
    if obj.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def render(scene: Scene, image_size: int = 96) -> Image.Image:
    """The scene as an RGB image of ``image_size`` x ``image_size`` pixels."""
    image = Image.new("RGB", (image_size, image_size), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, image_size / GRID)
    return image


# ------------------------------------------------------------------------------- dense patch labels

KINDS: tuple[str, ...] = ("none", *SHAPES, "digit")


def patch_labels(scene: Scene, grid: int) -> dict[str, list[int]]:
    """Per-patch class labels on a ``grid`` x ``grid`` patch board (row-major), for dense supervision.

    -> {"kind": index into KINDS, "color": colour of the cell's object (or the background) as an
    index into COLORS, "digit": 0..9 inside a digit's cell else 10, "background": the background
    colour (every patch)}. A patch belongs to the cell holding its centre.
    """
    colors = list(COLORS)
    by_cell = {(o.row, o.col): o for o in scene.objects}
    out: dict[str, list[int]] = {"kind": [], "color": [], "digit": [], "background": []}
    for i in range(grid * grid):
        r, c = (i // grid) * GRID // grid, (i % grid) * GRID // grid
        obj = by_cell.get((r, c))
        out["kind"].append(KINDS.index(obj.kind) if obj else 0)
        out["color"].append(colors.index(obj.color if obj else scene.background))
        out["digit"].append(int(obj.digit) if obj and obj.digit is not None else 10)
        out["background"].append(colors.index(scene.background))
    return out


# ----------------------------------------------------------------------------------- public API


def check_families(families: Sequence[str] | None) -> tuple[str, ...]:
    """The families to build (default all), validated."""
    if families is None:
        return FAMILIES
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise UserError(f"probe families must be a non-empty subset of: {', '.join(FAMILIES)} (got {list(families)})")
    return tuple(families)


def make_scene_qa(index: int, *, seed: int = 0, split: str = "test",
                  families: Sequence[str] | None = None) -> tuple[str, Scene, str, str]:
    """-> (family, scene, question, answer) of item ``index``; families are round-robin."""
    fams = check_families(families)
    family = fams[index % len(fams)]
    rng = random.Random(f"prunebench-probe:{split}:{seed}:{index}")
    # builders balance answers with the per-family round; map it back to a FAMILIES-sized stride
    scene, question, answer = BUILDERS[family](rng, (index // len(fams)) * len(FAMILIES))
    return family, scene, question, answer


def make_item(index: int, *, seed: int = 0, image_size: int = 96, split: str = "test",
              families: Sequence[str] | None = None) -> Item:
    """Item ``index`` of the suite (independent of the suite's length)."""
    family, scene, question, answer = make_scene_qa(index, seed=seed, split=split, families=families)
    return Item(index, render(scene, image_size), question, answer, family)


def build_probe(n: int = 600, *, seed: int = 0, image_size: int = 96, split: str = "test",
                families: Sequence[str] | None = None) -> list[Item]:
    """``n`` deterministic items, families balanced round-robin."""
    if n < 0:
        raise UserError(f"probe n must be >= 0, got {n}")
    return [make_item(i, seed=seed, image_size=image_size, split=split, families=families) for i in range(n)]


def mcq_options(question: str) -> dict[str, str]:
    """The lettered options listed in a question ({"A": "red", ...}); empty for non-MCQ questions."""
    found = dict(re.findall(r"^([A-D])\. (\w+)$", question, flags=re.MULTILINE))
    return {L: found[L] for L in LETTERS if L in found}


def all_questions() -> list[str]:
    """Question templates and the words they are filled with (tokenizer training corpus)."""
    out = [Q_BACKGROUND, Q_COUNT, Q_READING]
    out += [Q_EXISTENCE.format(color=c, shape=s) for c in COLORS for s in SHAPES]
    for s in SHAPES:
        opts = "\n".join(f"{L}. {c}" for L, c in zip(LETTERS, COLORS, strict=False))
        out.append(Q_ATTRIBUTE.format(shape=s, options=opts))
        out += [Q_SPATIAL.format(a=s, b=b) for b in SHAPES if b != s]
    out += [f"{L}. {c}" for L in LETTERS for c in COLORS]
    return out


def all_answers() -> list[str]:
    return [*COLORS, "yes", "no", *LETTERS, *(str(d) for d in range(10)), "left", "right"]
