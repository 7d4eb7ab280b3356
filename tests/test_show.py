"""Overlays and position histograms of the kept tokens (`prunebench/show.py`, `prunebench/analysis.py`), drawn
from real runs of the tiny checkpoints (the images re-created from the record's dataset config)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prunebench import runner, show
from prunebench.analysis import position_bias
from prunebench.kept import from_runs, locate
from prunebench.record import read_jsonl

matplotlib = pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def runs(tiny_path, tmp_path_factory):
    from test_runner import config

    out = tmp_path_factory.mktemp("show")
    return {name: runner.run(config(tiny_path, out, f"method={name}", "keep=0.25"), quiet=True).parent
            for name in ("random_pre", "tome", "fastv")}


def test_overlay_cells_follow_the_record(runs):
    """A uniform image: a kept cell keeps its value, a dropped one is dimmed, exactly per the stored index."""
    grey = np.full((48, 48, 3), 0.8)
    record, rows = show.run_files(runs["random_pre"])
    row = show.sample_row(rows, 1)
    (title, panel), = show.panels(row, [grey])
    kept = set(from_runs(row["kept"]["index"]))
    h, w = row["kept"]["layout"][0]["grid"]
    cells = panel.reshape(h, show.CELL, w, show.CELL, 3).mean(axis=(1, 3, 4))
    expected = np.array([[0.8 if r * w + c in kept else 0.8 * show.DIM for c in range(w)] for r in range(h)])
    assert np.allclose(cells, expected)
    assert title.endswith(f"{len(kept)}/{h * w}") and len(kept) == row["n_visual_out"] == 9


def test_merged_cells_take_their_kept_token_colour(runs):
    record, rows = show.run_files(runs["tome"])
    row = show.sample_row(rows, None)
    kept_field = row["kept"]
    (_, panel), = show.panels(row, [np.zeros((48, 48, 3))])
    dropped = sorted(set(range(kept_field["n"])) - set(from_runs(kept_field["index"])))
    w = kept_field["layout"][0]["grid"][1]
    for index, into in zip(dropped, kept_field["merged_into"], strict=True):
        r, c = divmod(index, w)
        cell = panel[r * show.CELL, c * show.CELL]
        assert np.allclose(cell, show.TINT * show.group_colour(into))


def test_figure_renders_the_sample_of_each_run(runs, tmp_path):
    out = tmp_path / "cmp.png"
    assert show.main(["--compare", str(runs["random_pre"]), str(runs["tome"]), "--index", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    record, rows = show.run_files(runs["fastv"])
    fig = show.overlay_figure([(record, show.sample_row(rows, 0), show.sample_images(record, 0))])
    fig.canvas.draw()  # Agg
    pixels = np.asarray(fig.canvas.buffer_rgba())
    assert pixels.shape[2] == 4 and pixels[..., :3].std() > 0
    (_, panel), = show.panels(show.sample_row(rows, 0), show.sample_images(record, 0))
    assert np.array_equal(fig.axes[0].images[0].get_array(), panel)  # the figure shows exactly the overlay


def test_position_histogram_counts_the_kept_tokens(runs, tmp_path):
    for path in runs.values():
        rows = read_jsonl(path / "predictions.jsonl")
        bias = position_bias(rows)
        assert bias.heat.shape == (6, 6) and bias.n_samples == len(rows) == 4
        assert int(bias.heat.sum()) + bias.n_unplaced == bias.n_kept == sum(r["kept"]["k"] for r in rows)
        assert bias.rows.sum() == bias.cols.sum() == bias.heat.sum()
        first = rows[0]["kept"]  # each kept token is in its own cell on the shared grid
        for i in from_runs(first["index"]):
            _, r, c = locate(first["layout"], i)
            assert bias.heat[r, c] >= 1
    out = tmp_path / "bias.png"
    assert show.main(["--bias", *map(str, runs.values()), "--out", str(out)]) == 0 and out.stat().st_size > 0


def test_unknown_sample_and_vanilla_runs_say_so_in_one_line(runs, tmp_path, capsys):
    assert show.main([str(runs["random_pre"]), "--index", "99", "--out", str(tmp_path / "x.png")]) == 2
    assert "the run has no sample 99; samples with kept tokens: 0..3" in capsys.readouterr().err
    assert show.main(["/nonexistent/run", "--out", str(tmp_path / "x.png")]) == 2
    assert "/nonexistent/run does not exist" in capsys.readouterr().err
    folder = tmp_path / "vanilla"
    folder.mkdir()
    (folder / "record.json").write_text(json.dumps({"method": "vanilla"}))
    (folder / "predictions.jsonl").write_text(json.dumps({"index": 0, "n_visual_out": 36}) + "\n")
    assert show.main([str(folder), "--out", str(tmp_path / "y.png")]) == 2
    assert "no kept field" in capsys.readouterr().err
    assert show.main(["--bias", str(folder), "--out", str(tmp_path / "z.png")]) == 2
    assert "no kept tokens to place" in capsys.readouterr().err and not (tmp_path / "z.png").exists()


def test_without_matplotlib_one_line(runs, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert show.main([str(runs["random_pre"]), "--out", str(tmp_path / "z.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prunebench.show: prunebench.show draws with matplotlib: pip install -e .[plot]"]


def test_internvl_tiles_are_placed_as_the_processor_cuts_them():
    """For image shapes of every aspect, the arrangement drawn for the processor's tile count is the grid the
    processor itself chose (GOT-OCR2 tiling, 1..12 tiles of 448 px)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    from prunebench import show

    rng = np.random.default_rng(0)
    for height, width in [(448, 448), (100, 900), (900, 100), (300, 700), (1000, 1500)] + \
            [tuple(int(v) for v in rng.integers(50, 3000, 2)) for _ in range(40)]:
        cols, rows = get_optimal_tiled_canvas((height, width), (448, 448), 1, 12)
        assert show.tile_arrangement(rows * cols, height, width, 448) == (rows, cols), (height, width)
