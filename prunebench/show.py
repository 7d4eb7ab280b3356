"""Draw which visual tokens a run kept: `python -m prunebench.show RECORD_DIR_OR_JSON [--index I] [--out FILE.png]`.

One panel per layout unit of the sample (`kept.layout`): the image (re-created from the record's dataset config;
built-in suites only) cut into the unit's grid, kept cells as they are, dropped cells dimmed, cells merged into a
kept token tinted with that token's colour. Videos: a strip of frames; InternVL: one panel per tile and the
thumbnail; Qwen: the real grid of grid_thw. `--compare DIR ...`: one row per run, same sample. `--bias DIR ...`:
per run, the kept tokens' position histogram (2-D map, rows, columns) over all its samples (`analysis.py`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from prunebench.analysis import PositionBias, position_bias
from prunebench.errors import UserError
from prunebench.kept import from_runs, unit_tokens
from prunebench.record import PREDICTIONS_NAME, RECORD_NAME, read_jsonl

DIM = 0.25  # brightness of a dropped cell
TINT = 0.55  # weight of the group colour in a merged cell
CELL = 16  # pixels per token cell in a panel


def run_files(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A record folder, its record.json or its predictions.jsonl -> (record, prediction rows)."""
    if not path.exists():
        raise UserError(f"{path} does not exist: give a job folder (results/<model>/<dataset>/<method>/keep...), "
                        f"its {RECORD_NAME} or its {PREDICTIONS_NAME}")
    folder = path if path.is_dir() else path.parent
    record_path = folder / RECORD_NAME
    if not record_path.exists():
        raise UserError(f"no {RECORD_NAME} in {folder}/ (a job folder holds one)")
    return json.loads(record_path.read_text()), read_jsonl(folder / PREDICTIONS_NAME)


def sample_row(rows: list[dict[str, Any]], index: int | None) -> dict[str, Any]:
    """The prediction row of sample `index` (default: the first with a kept field)."""
    with_kept = [r for r in rows if r.get("kept")]
    if not with_kept:
        raise UserError("the run's predictions hold no kept field (vanilla, keep=1.0, or written before it existed)")
    if index is None:
        return with_kept[0]
    for row in with_kept:
        if int(row["index"]) == index:
            return row
    indices = sorted(int(r["index"]) for r in with_kept)
    if all(int(r["index"]) != index for r in rows):
        raise UserError(f"the run has no sample {index}; samples with kept tokens: {indices[0]}..{indices[-1]}")
    raise UserError(f"sample {index} has no kept field in this run (it failed, or kept every token); samples with "
                    f"kept tokens: {indices[0]}..{indices[-1]}")


def sample_images(record: dict[str, Any], index: int) -> list[np.ndarray]:
    """The sample's image, or its frames, as float RGB [H, W, 3] in 0..1, re-created from the dataset config."""
    from prunebench.data.datasets import DATASET_KINDS, build_dataset

    cfg = dict(record.get("config", {}).get("dataset", {}))
    if str(cfg.get("kind")) not in DATASET_KINDS.names():
        raise UserError(f"cannot re-create the images of dataset '{record.get('dataset')}': only the built-in suites "
                        f"({', '.join(DATASET_KINDS.names())}) are generated from their config")
    items = {it.index: it for it in build_dataset(cfg).items()}
    item = items[index]
    pictures = item.frames or (item.image,)
    return [np.asarray(p.convert("RGB"), dtype=np.float64) / 255.0 for p in pictures]


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of [H, W, 3] to [h, w, 3]."""
    rows = (np.arange(h) * image.shape[0] // h).clip(0, image.shape[0] - 1)
    cols = (np.arange(w) * image.shape[1] // w).clip(0, image.shape[1] - 1)
    return image[rows][:, cols]


def group_colour(token: int) -> np.ndarray:
    """A fixed colour per kept token (golden-angle hues)."""
    import colorsys

    return np.array(colorsys.hsv_to_rgb((token * 0.618034) % 1.0, 0.9, 1.0))


def unit_overlay(image: np.ndarray, unit: dict[str, Any], kept: set[int],
                 merged_into: dict[int, int] | None = None, cell: int = CELL) -> np.ndarray:
    """One unit's panel [h*cell, w*cell, 3]: the image region cut into the unit's grid, kept cells unchanged,
    dropped cells dimmed, cells merged into a kept token blended with that token's colour."""
    h, w = unit["grid"]
    out = _resize(image, h * cell, w * cell).copy()
    stride = w + int(unit.get("newline", False))
    for r in range(h):
        for c in range(w):
            index = unit["start"] + r * stride + c
            if index in kept:
                continue
            block = out[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
            into = None if merged_into is None else merged_into.get(index)
            block[:] = block * (1 - TINT) + TINT * group_colour(into) if into is not None else block * DIM
    return out


def unit_region(images: list[np.ndarray], layout: list[dict[str, Any]], u: int) -> np.ndarray:
    """The part of the sample's picture a unit shows: a frame of a video, a tile of an InternVL image (tiles in
    raster order over the image, the last of several its thumbnail), else the whole image."""
    unit = layout[u]
    if unit["kind"] == "frame":
        n_frames = 1 + max(v["frame"] for v in layout if v["kind"] == "frame" and v["image"] == unit["image"])
        return images[min(len(images) - 1, unit["frame"] * len(images) // n_frames)]
    image = images[0]
    if unit["kind"] != "tile":
        return image
    tiles = [v for v in layout if v["kind"] == "tile" and v["image"] == unit["image"]]
    if len(tiles) == 1 or unit["tile"] == tiles[-1]["tile"]:
        return image  # the only tile, or the thumbnail
    rows, cols = tile_arrangement(len(tiles) - 1, image.shape[0], image.shape[1], unit.get("tile_px"))
    r, c = divmod(unit["tile"] - tiles[0]["tile"], cols)
    h, w = image.shape[0] / rows, image.shape[1] / cols
    return image[int(r * h) : int((r + 1) * h), int(c * w) : int((c + 1) * w)]


def tile_arrangement(n: int, height: int, width: int, tile_px: int | None = None) -> tuple[int, int]:
    """(rows, cols) of n crops of a height x width image, as the InternVL (GOT-OCR2) processor arranges them: its
    own `get_optimal_tiled_canvas` (the closest aspect ratio; ties by area, for tiles of tile_px) restricted to
    grids of n tiles, the one it chose among all. Without that module: the factorisation closest in aspect."""
    try:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
    except ImportError:
        pairs = [(r, n // r) for r in range(1, n + 1) if n % r == 0]
        return min(pairs, key=lambda p: abs(p[1] / p[0] - width / height))
    side = tile_px or max(1, round(math.sqrt(height * width / n)))
    cols, rows = get_optimal_tiled_canvas((height, width), (side, side), n, n)
    return rows, cols


def panels(row: dict[str, Any], images: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """(title, panel) per drawable unit of the row's kept field (newline tokens are summed into a title)."""
    kept_field = row["kept"]
    layout = kept_field["layout"]
    kept = set(from_runs(kept_field["index"]))
    dropped = sorted(set(range(kept_field["n"])) - kept)
    into = {i: t for i, t in zip(dropped, kept_field["merged_into"], strict=True) if t >= 0} \
        if "merged_into" in kept_field else None  # -1: dropped without merging, dimmed
    out = []
    for u, unit in enumerate(layout):
        if unit["kind"] == "newline":
            continue
        span = range(unit["start"], unit["start"] + unit_tokens(unit))
        title = f"{unit['kind']} {unit.get('frame', unit.get('tile', unit['image']))}: " \
                f"{len(kept.intersection(span))}/{len(span)}"
        out.append((title, unit_overlay(unit_region(images, layout, u), unit, kept, into)))
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("prunebench.show draws with matplotlib: pip install -e .[plot]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(record: dict[str, Any]) -> str:
    return f"{record.get('model')} {record.get('method')} keep={record.get('keep')}"


def overlay_figure(runs: list[tuple[dict[str, Any], dict[str, Any], list[np.ndarray]]]):
    """The runs (record, row, images) side by side: one column per run when each draws one panel, else one row of
    panels (tiles, frames, views) per run. Each run's first panel is titled with its method, keep and count."""
    plt = _pyplot()
    rows = [panels(row, images) for _, row, images in runs]
    width = max(len(p) for p in rows)
    side_by_side = width == 1
    shape = (1, len(rows)) if side_by_side else (len(rows), width)
    fig, axes = plt.subplots(*shape, figsize=(2.6 * shape[1], 3.0 * shape[0]), squeeze=False)
    for r, ((record, row, _), row_panels) in enumerate(zip(runs, rows, strict=True)):
        cells = [axes[0][r]] if side_by_side else list(axes[r])
        for c, ax in enumerate(cells):
            ax.axis("off")
            if c < len(row_panels):
                title, panel = row_panels[c]
                ax.imshow(panel, interpolation="nearest")
                head = f"{record.get('method')} keep={record.get('keep')}: {row['n_visual_out']}/" \
                       f"{row['kept']['n']} kept\n" if c == 0 else ""
                ax.set_title(head + title, fontsize=8)
    models = sorted({str(record.get("model")) for record, _, _ in runs})
    fig.suptitle(f"{', '.join(models)}: sample {runs[0][1]['index']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def bias_figure(runs: list[tuple[dict[str, Any], PositionBias]]):
    """Per run: the 2-D map of kept positions, and the row and column profiles (fractions of the kept)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 3, figsize=(9, 2.8 * len(runs)), squeeze=False)
    for (record, bias), (heat_ax, row_ax, col_ax) in zip(runs, axes, strict=True):
        placed = max(int(bias.heat.sum()), 1)
        heat_ax.imshow(bias.heat / placed, cmap="viridis", interpolation="nearest")
        heat_ax.set_title(f"{_label(record)} ({bias.n_samples} samples)", fontsize=8)
        row_ax.barh(np.arange(bias.heat.shape[0]), bias.rows / placed)
        row_ax.invert_yaxis()
        row_ax.set_title("per row", fontsize=8)
        col_ax.bar(np.arange(bias.heat.shape[1]), bias.cols / placed)
        col_ax.set_title("per column", fontsize=8)
    fig.tight_layout()
    return fig


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m prunebench.show", description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="*", type=Path, help="a record folder, its record.json or predictions.jsonl")
    parser.add_argument("--index", type=int, help="sample index (default: the first with kept tokens)")
    parser.add_argument("--out", type=Path, default=Path("prunebench-show.png"), help="PNG to write")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="DIR", help="several runs side by side")
    parser.add_argument("--bias", nargs="+", type=Path, metavar="DIR", help="position histograms of runs")
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.run, args.compare, args.bias)) != 1:
        parser.error("give one of: RUN, --compare DIR ..., --bias DIR ...")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.bias:
            runs = [(rec, position_bias(rows)) for rec, rows in map(run_files, args.bias)]
            empty = [_label(rec) for rec, bias in runs if bias.n_samples == 0]
            if empty:
                raise UserError(f"no kept tokens to place in {', '.join(empty)} (vanilla, keep=1.0, or written "
                                f"before rows held a kept field)")
            fig = bias_figure(runs)
        else:
            runs = []
            for path in args.compare or args.run:
                record, rows = run_files(path)
                row = sample_row(rows, args.index if args.index is not None else
                                 (runs[0][1]["index"] if runs else None))
                runs.append((record, row, sample_images(record, int(row["index"]))))
            fig = overlay_figure(runs)
    except UserError as err:
        print(f"prunebench.show: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
