"""Where a method's kept tokens sit: position histograms over the grid, aggregated over a run's samples.

Each kept token is placed by its layout unit (`prunebench/kept.py`): (row + 0.5) / h and (col + 0.5) / w within
that unit's grid (an image, base view, packed views, tile, thumbnail or frame), binned into a bins_h x bins_w
map, so samples whose grids differ (dynamic resolution, any-resolution packing) add up. Newline tokens have no
cell: they are counted in `n_unplaced`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from prunebench.kept import from_runs, locate


@dataclass
class PositionBias:
    heat: np.ndarray  # [bins_h, bins_w] kept tokens per cell
    n_samples: int  # rows with a kept field and a layout
    n_kept: int  # kept tokens over those rows (placed + unplaced; inserted tokens not included)
    n_unplaced: int  # kept newline tokens (no cell)

    @property
    def rows(self) -> np.ndarray:
        """[bins_h] kept tokens per grid row."""
        return self.heat.sum(axis=1)

    @property
    def cols(self) -> np.ndarray:
        """[bins_w] kept tokens per grid column."""
        return self.heat.sum(axis=0)


def common_grid(rows: Iterable[Mapping[str, Any]]) -> tuple[int, int] | None:
    """The grid every unit of every row shares (newlines aside), or None when they differ."""
    grids = {tuple(u["grid"]) for r in rows for u in (r.get("kept") or {}).get("layout", [])
             if u["kind"] != "newline"}
    return next(iter(grids)) if len(grids) == 1 else None


def position_bias(rows: Iterable[Mapping[str, Any]], bins: tuple[int, int] | None = None) -> PositionBias:
    """Histogram of the kept tokens' positions over `rows` (prediction rows). bins: the map's size; default the
    grid the units share, else 24 x 24."""
    rows = [r for r in rows if r.get("kept") and r["kept"].get("layout")]
    bins = bins or common_grid(rows) or (24, 24)
    heat = np.zeros(bins, dtype=np.int64)
    n_kept = n_unplaced = 0
    for row in rows:
        layout = row["kept"]["layout"]
        for i in from_runs(row["kept"]["index"]):
            n_kept += 1
            unit, r, c = locate(layout, i)
            if r is None:
                n_unplaced += 1
                continue
            h, w = layout[unit]["grid"]
            heat[int((r + 0.5) / h * bins[0]), int((c + 0.5) / w * bins[1])] += 1
    return PositionBias(heat=heat, n_samples=len(rows), n_kept=n_kept, n_unplaced=n_unplaced)
