"""Which visual tokens a sample kept, stored with its prediction row (`predictions.jsonl` field `kept`).

Space `llm_visual`: the visual placeholder tokens of the sample's prompt, in sequence order (0 .. n-1,
n = `n_visual_in`), i.e. the visual tokens as they would enter the LLM unpruned, for every stage: a vision-stage
merge or a pre-LLM selection drops some of them before the LLM, an intra-LLM method from layer K on (the
final set of its last stage). `layout` says how those n tokens are laid out, unit by unit (image, base view,
packed views with row newlines, tile, thumbnail, video frame), so an index maps to (image, unit, row, col).

Indices are stored as runs: a flat list [start, length, start, length, ...] of contiguous ranges.
"""

from __future__ import annotations

from typing import Any

import torch

from prunebench.stages.state import CallState

SPACE = "llm_visual"


def to_runs(index: list[int]) -> list[int]:
    """Sorted distinct ints -> [start, length, ...] of their contiguous runs."""
    out: list[int] = []
    for i in index:
        if out and out[-2] + out[-1] == i:
            out[-1] += 1
        else:
            out += [i, 1]
    return out


def from_runs(runs: list[int]) -> list[int]:
    """[start, length, ...] -> the ints they cover."""
    return [i for s, n in zip(runs[::2], runs[1::2], strict=True) for i in range(s, s + n)]


def unit_tokens(unit: dict[str, Any]) -> int:
    """Tokens a layout unit holds: h rows of w cells, plus one newline per row for packed views."""
    h, w = unit["grid"]
    return h * (w + int(unit.get("newline", False)))


def locate(layout: list[dict[str, Any]], index: int) -> tuple[int, int | None, int | None]:
    """An llm_visual index -> (unit, row, col) in that unit's grid; row/col None for a newline token."""
    for u, unit in enumerate(layout):
        start, n = unit["start"], unit_tokens(unit)
        if start <= index < start + n:
            h, w = unit["grid"]
            row, col = divmod(index - start, w + int(unit.get("newline", False)))
            return (u, None, None) if col >= w or unit["kind"] == "newline" else (u, row, col)
    raise IndexError(f"index {index} is outside the layout ({sum(unit_tokens(u) for u in layout)} tokens)")


def kept_rows(state: CallState, b: int) -> list[tuple[torch.Tensor, int]] | None:
    """Per batch row: (sorted llm_visual indices kept, tokens a stage inserted beside them), after the last
    stage of the last prompt; None when no visual tokens were seen."""
    image = state.prompt_image_mask
    if image is None or image.shape[0] != b:
        return None
    out = []
    for row in range(b):
        rows = torch.arange(image.shape[1], device=image.device)
        entry, intra = state.entry, state.intra
        if entry is not None:
            rows = entry.index[row] if entry.pad is None else entry.index[row][~entry.pad[row]]
            seq = entry.index[row]
        else:
            seq = rows
        inserted = 0
        if intra is not None:
            real = torch.ones_like(intra.index[row], dtype=torch.bool)
            if intra.pad is not None:
                real &= ~intra.pad[row]
            if intra.inserted is not None:
                inserted = int((intra.inserted[row] & real).sum())
                real &= ~intra.inserted[row]
            rows = seq[intra.index[row][real]]
        rank = image[row].long().cumsum(0) - 1  # llm_visual index of each visual row
        rows = rows[image[row, rows]]
        out.append((rank[rows].sort().values, inserted))
    return out


def merge_groups(state: CallState, row: int, kept: torch.Tensor) -> list[int] | None:
    """For a merging stage that reports its groups (the encoder merge drivers: shared, Qwen, InternVL, LLaVA-NeXT
    packed; pre-LLM methods whose Selection carries `groups`): for each dropped llm_visual index (ascending), the llm_visual index of the kept
    token it merged into, -1 for one dropped without merging; None when the stage exposes no groups."""
    if state.merge_groups is None:
        return None
    groups, sizes = state.merge_groups
    image = state.prompt_image_mask
    flat = image.flatten().nonzero()[:, 0]
    if len(groups) != len(sizes) or any(g.numel() != n for g, n in zip(groups, sizes, strict=True)):
        return None  # the groups are not in the units' token space (e.g. packed after merging)
    into = torch.cat([torch.where(g >= 0, rows[g.clamp(min=0).to(rows.device)], -1)
                      for rows, g in zip(flat.split(sizes), groups, strict=True)])
    width = image.shape[1]
    mine = (flat // width) == row
    rank = image[row].long().cumsum(0) - 1
    target = torch.where(into[mine] >= 0, rank[into[mine].clamp(min=0) % width], -1)
    n = int(image[row].sum())
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[kept.cpu()] = False
    target = target.cpu()
    # a token whose holder a later stage dropped (an intra-LLM stage of MustDrop or a pipeline) is held by none
    target = torch.where(torch.isin(target, kept.cpu()), target, -1)
    return target[dropped].tolist()


def kept_fields(state: CallState, layouts: list[list[dict[str, Any]]] | None, b: int) -> list[dict[str, Any] | None]:
    """The `kept` field of each batch row (None where nothing is known)."""
    rows = kept_rows(state, b)
    if rows is None:
        return [None] * b
    out: list[dict[str, Any] | None] = []
    for row, (kept, inserted) in enumerate(rows):
        n = int(state.prompt_image_mask[row].sum())
        field: dict[str, Any] = {"space": SPACE, "n": n, "k": int(kept.numel()), "index": to_runs(kept.tolist())}
        if inserted:
            field["inserted"] = inserted
        groups = merge_groups(state, row, kept)
        if groups is not None:
            field["merged_into"] = groups
        if layouts is not None:
            field["layout"] = layouts[row]
        out.append(field)
    return out


def split_layout(units: list[dict[str, Any]], n_per_row: list[int]) -> list[list[dict[str, Any]]] | None:
    """A batch's layout units (scatter order, `image` numbered over the batch) -> per row, with `start` offsets
    in that row's llm_visual space and images numbered from 0 in each row; None when the units do not add up
    to the rows' visual-token counts."""
    out: list[list[dict[str, Any]]] = []
    it = iter(units)
    for n in n_per_row:
        row, at = [], 0
        while at < n:
            unit = next(it, None)
            if unit is None:
                return None
            first = row[0]["image"] if row else unit["image"]
            row.append({**unit, "image": unit["image"] - first, "start": at})
            at += unit_tokens(unit)
        if at != n:
            return None
        out.append(row)
    return out if next(it, None) is None else None
