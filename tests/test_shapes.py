from __future__ import annotations

from collections import Counter

import pytest

from prunebench.data.shapes import (
    CATEGORIES,
    COLORS,
    MAX_SHAPES,
    Sample,
    build_shapes,
    score_answer,
    templates_corpus,
)

VALID_ANSWERS = {
    "background": set(COLORS),
    "existence": {"yes", "no"},
    "count": {str(k) for k in range(1, MAX_SHAPES + 1)},
    "color": set(COLORS),
    "position": {"left", "right"},
}


def _key(s: Sample) -> tuple:
    return s.index, s.question, s.answer, s.category, s.image.tobytes()


def test_deterministic_by_seed() -> None:
    a, b = build_shapes(30, seed=3), build_shapes(30, seed=3)
    assert [_key(s) for s in a] == [_key(s) for s in b]
    c = build_shapes(30, seed=4)
    assert [_key(s) for s in a] != [_key(s) for s in c]


def test_prefix_stable() -> None:
    assert [_key(s) for s in build_shapes(10)] == [_key(s) for s in build_shapes(25)[:10]]


def test_categories_balanced_round_robin() -> None:
    samples = build_shapes(60)
    assert Counter(s.category for s in samples) == {c: 12 for c in CATEGORIES}
    assert [s.category for s in samples[:5]] == list(CATEGORIES)
    assert [s.index for s in samples] == list(range(60))


def test_answers_valid_and_in_corpus() -> None:
    corpus = set(templates_corpus())
    for s in build_shapes(100, seed=1):
        assert s.answer in VALID_ANSWERS[s.category], s
        assert s.question in corpus and s.answer in corpus


def test_images_right_size() -> None:
    for size in (48, 96):
        for s in build_shapes(10, image_size=size):
            assert s.image.size == (size, size) and s.image.mode == "RGB"


def test_background_answer_matches_pixels() -> None:
    for s in build_shapes(50, seed=2):
        if s.category == "background":
            assert s.image.getpixel((0, 0)) == COLORS[s.answer]


def test_yes_no_and_left_right_balanced() -> None:
    samples = build_shapes(100)
    assert Counter(s.answer for s in samples if s.category == "existence") == {"yes": 10, "no": 10}
    assert Counter(s.answer for s in samples if s.category == "position") == {"left": 10, "right": 10}


def test_question_templates() -> None:
    samples = build_shapes(20)
    by_cat = {s.category: s.question for s in samples}
    assert by_cat["background"] == "What color is the background? Answer with one word."
    assert by_cat["count"] == "How many shapes are in the image? Answer with a number."
    assert by_cat["existence"].startswith("Is there a") and by_cat["existence"].endswith("Answer yes or no.")


@pytest.mark.parametrize(
    ("prediction", "answer", "ok"),
    [
        ("Yes.", "yes", True),
        (" yes", "yes", True),
        ("YES, there is", "yes", True),
        ("no", "yes", False),
        ("", "yes", False),
        ("two", "2", True),
        ("2.", "2", True),
        ("Red", "red", True),
        ("left side", "left", True),
        ("right", "left", False),
    ],
)
def test_score_answer(prediction: str, answer: str, ok: bool) -> None:
    assert score_answer(prediction, answer) is ok


def test_build_shapes_edge_cases() -> None:
    assert build_shapes(0) == []
    with pytest.raises(ValueError):
        build_shapes(-1)
