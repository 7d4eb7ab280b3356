"""Vision-stage merges inside the Qwen2.5-VL / Qwen2-VL ViT, at 2x2 merge-unit granularity.

The harness's stated choice: the vision-encoder stage runs at 2x2 merge-unit granularity,
consistent with window attention and full-attention blocks.

- A merge *unit* is the `spatial_merge_unit` (4) consecutive ViT rows that the patch merger later
  turns into one LLM token; a unit is what EvoPrune merges. A unit's feature for similarity and
  local diversity is the mean of its 4 rows; its importance is the mean over its 4 rows of the
  attention they receive (`received_attention`), recomputed from the block's own fused `qkv`
  output with the vision rotary embedding applied as the attention applies it, per attention
  segment of that block: the image (or temporal slice) for full-attention blocks, the window for
  windowed blocks (Qwen2.5-VL). No eager attention, no second pass.
- The bipartite step (`evoprune_merge`, a = even / b = odd current positions) runs on the unit
  means and decides; the same merge is applied to the 4-row units (`merge_units`): unit a is
  averaged into unit b row by row, size-weighted (ToMe sizes in units), so every unit keeps its
  2x2 structure. The merged unit keeps b's identity: its raster index (the representative), its
  place in the sequence, its rows' rotary embeddings and its window.
- Budget per image and per temporal slice of a video (a "part", the LLM's budget unit):
  n_keep = round-half-up(keep * units) (`n_keep_for`), removed over ALL ViT blocks (Qwen selects
  the last block's output) by that part's own `layer_schedule(strategy, n_blocks, units,
  units - n_keep)`. Merges happen only among units of the same part, one part at a time.
- The sequence shortens after a merge, so the later blocks get substituted keyword arguments
  (forward pre-hooks): `position_embeddings` gathered to the surviving rows, `cu_seqlens` recomputed
  from the surviving units of each full-attention segment or window (empty windows dropped), and
  `max_seqlen` when the caller passes one (Flash). The merge itself sits between attention and MLP
  through a per-instance class swap of the block (`merging_block_class`); `merge_point=layer`
  merges on the block's output instead.
- The merger sees fewer units, in window order; a forward hook on `merger` scatters its output back
  to the full unit count (zeros for merged-away units), so the tower's own `reverse_indices`
  un-permutation works unchanged, and records `state.visual_sizes` (units per part, placeholder
  order) and `state.visual_keep` (per part: the representatives' raster indices, sorted); the LLM
  entry drops the rest. Positions: original M-RoPE ids, a merged token at its representative's.
- keep=1.0 installs nothing at all (every schedule would be zeros): bit-identical to the model.
  A keep that the ViT's depth cannot reach for some image (each block merges at most half of its
  units) raises `UserError` ("... at most N ...") when that image reaches the tower.

`schedule` (what `Installation.schedule` reports) is per-block merges summed over the parts of the
last tower call, updated in place; `state.vision.schedules` has the per-part schedules.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

from prunebench.errors import UserError
from prunebench.methods.base import ResolvedMethod, n_keep_for
from prunebench.methods.merge_ops import merge_units
from prunebench.methods.tome_ops import head_mean_keys
from prunebench.seams import Seams, merging_subclass
from prunebench.stages.attention import received_attention
from prunebench.stages.patches import ClassSwaps
from prunebench.stages.state import CallState
from prunebench.stages.vision import merge_params, unapplied_prop_attn
from prunebench.timing import Timer


def _merging_block_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                           position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                           **kwargs) -> torch.Tensor:
    """`Qwen2_5_VLVisionBlock.forward` / `Qwen2VLVisionBlock.forward` (transformers 5.23, identical) line
    for line, plus `self._pb_merge` between attention and MLP, set per instance by `QwenVisionMerge`."""
    hidden_states = hidden_states + self.attn(
        self.norm1(hidden_states),
        cu_seqlens=cu_seqlens,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states = self._pb_merge(hidden_states)
    hidden_states = hidden_states + self.mlp(self.norm2(hidden_states))
    return hidden_states


def merging_block_class(base: type[nn.Module]) -> type[nn.Module]:
    """Qwen vision block class with the merge step between attention and MLP."""
    return merging_subclass(base, _merging_block_forward)


@dataclass
class UnitState:
    """One tower call: a row per merge unit still in the sequence, in sequence (window) order."""

    pos: torch.Tensor  # [U] index of the unit in the tower's permuted sequence at entry (rows pos*m ...)
    rep: torch.Tensor  # [U] raster index of the unit within its part (the representative)
    part: torch.Tensor  # [U] budget part: image, or temporal slice of a video, in placeholder order
    full: torch.Tensor  # [U] full-attention segment
    window: torch.Tensor  # [U] attention window (== full without window attention)
    size: torch.Tensor  # [U] float32 original units each unit stands for
    n_units: list[int]  # units per part at entry
    schedules: list[list[int]]  # per part: merges at each block
    n_total: int
    clamped: bool = False
    # [U0] per unit at entry: the index (in these arrays) of the unit now holding it, for the record (`kept.py`)
    group: torch.Tensor | None = None
    origin: tuple[torch.Tensor, torch.Tensor] | None = None  # (rep, part) of the units at entry
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # the tower's, full sequence
    substitute: dict | None = None  # kwargs for later blocks once the sequence is shorter
    block: dict = field(default_factory=dict)  # what the current block was given: cu_seqlens, (cos, sin)


class QwenVisionMerge:
    """EvoPrune inside the Qwen2.5-VL / Qwen2-VL ViT on 2x2 merge units (see the module docstring)."""

    def __init__(self, seams: Seams, method: ResolvedMethod, keep: float, state: CallState, timer: Timer) -> None:
        if method.spec.merge is None or method.spec.schedule is None:
            raise UserError(f"{method.name}: not a merge method")
        self.seams, self.method, self.keep, self.state, self.timer = seams, method, keep, state, timer
        self.visual = seams.vision_tower
        self.blocks = list(seams.vision_layers)
        self.unit = int(self.visual.spatial_merge_size) ** 2
        fullatt = getattr(self.visual, "fullatt_block_indexes", None)
        self.windowed = fullatt is not None  # Qwen2.5-VL: window attention except in the full blocks
        self.full_blocks = set(fullatt) if self.windowed else set(range(len(self.blocks)))
        self.strategy = str(method.params["schedule"])
        self.merge_point = str(method.params.get("merge_point", "attention"))
        if self.merge_point not in ("attention", "layer"):
            raise UserError(f"{method.name}: merge_point must be one of: attention, layer (got '{self.merge_point}')")
        self.merge_params = merge_params(method)
        self.notes = unapplied_prop_attn(method, seams.family, "its windowed varlen attention takes no mask")
        if seams.deepstack is not None:
            self.notes.append(f"{method.name}: a DeepStack level taken at a ViT block before a merge carries the "
                              "surviving unit's own feature there (levels are not merged)")
        try:  # validates the strategy string now; the counts depend on each image's size
            method.spec.schedule(self.strategy, len(self.blocks), 0, 0)
        except ValueError as err:
            raise UserError(f"{method.name}: {err}") from None
        n_keep_for(keep, 1)
        self.active = keep < 1.0  # keep=1.0 merges nothing anywhere: install nothing
        self.schedule: list[int] = [0] * len(self.blocks)
        self._captured: dict[int, torch.Tensor] = {}
        self.swaps = ClassSwaps()
        self._rope = {i: sys.modules[type(b.attn).__module__].apply_rotary_pos_emb_vision
                      for i, b in enumerate(self.blocks)}

    # -- install --------------------------------------------------------------------------------
    def register(self) -> list:
        if not self.active:
            return []
        handles = [self.visual.register_forward_pre_hook(self._start, with_kwargs=True),
                   self.visual.merger.register_forward_hook(self._finish)]
        if self.seams.deepstack is not None:  # Qwen3-VL: the levels taken inside the ViT, at full length too
            handles += self.seams.deepstack.scatter_levels(self._full_length)
        needs_qkv = bool(self.method.spec.needs & {"received_attention", "keys"})
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(functools.partial(self._enter, i), with_kwargs=True))
            if needs_qkv:
                handles.append(block.attn.qkv.register_forward_hook(functools.partial(self._store_qkv, i)))
            step = functools.partial(self._merge, i)
            if self.merge_point == "layer":  # on the block's output; before transformers' capture hooks
                handles.append(block.register_forward_hook(lambda m, a, out, step=step: step(out), prepend=True))
                continue
            self.swaps.swap(block, merging_block_class(type(block)), step)
        return handles

    def restore(self) -> None:
        self.swaps.restore()
        self._captured.clear()

    # -- tower entry: the plan of this call -----------------------------------------------------------
    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise RuntimeError("prunebench: the Qwen vision tower was called without grid_thw")
        m, v = self.unit, self.visual
        n_units = [h * w // m for t, h, w in grid.tolist() for _ in range(t)]
        schedules, clamped = [], False
        for p, n in enumerate(n_units):
            n_keep, c = n_keep_for(self.keep, n)
            clamped |= c
            try:
                schedules.append(self.method.spec.schedule(self.strategy, len(self.blocks), n, n - n_keep))
            except ValueError as err:
                raise UserError(f"{self.method.name}: image/slice {p} has {n} merge units (2x2 patches) and the "
                                f"ViT {len(self.blocks)} blocks: {err}") from None
        device, total = grid.device, sum(n_units)
        copy = dict(kwargs)  # honour precomputed tensors the tower itself would use, without popping them
        cu_full = get_vision_cu_seqlens(grid, kwargs=copy)
        if self.windowed:
            window_index, cu_window = get_vision_window_index(
                grid, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                patch_size=v.patch_size, kwargs=copy)
        else:
            window_index, cu_window = torch.arange(total, device=device), cu_full
        window_index = window_index.to(device)
        starts = torch.tensor([0] + n_units, device=device).cumsum(0)
        part = torch.bucketize(window_index, starts[1:], right=True)
        rows = torch.arange(total, device=device) * m
        full = torch.bucketize(rows, cu_full.to(device)[1:], right=True)
        window = torch.bucketize(rows, cu_window.to(device)[1:], right=True)
        change = [t[1:] != t[:-1] for t in (part, full, window)]
        if bool((part[1:] < part[:-1]).any() | (change[0] & ~change[1]).any() | (change[1] & ~change[2]).any()):
            raise RuntimeError("prunebench: Qwen ViT segments are not nested image > full-attention > window")
        rep = window_index - starts[part]
        self.state.vision = UnitState(
            pos=torch.arange(total, device=device), rep=rep, part=part, full=full,
            window=window, size=torch.ones(total, device=device), n_units=n_units, schedules=schedules,
            n_total=total, clamped=clamped, group=torch.arange(total, device=device), origin=(rep, part))
        self._captured.clear()
        self.schedule[:] = [sum(s[i] for s in schedules) for i in range(len(self.blocks))]

    # -- block entry: shortened kwargs ---------------------------------------------------------------
    def _enter(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        st = self.state.vision
        if not isinstance(st, UnitState):
            return None
        if st.position_embeddings is None:
            st.position_embeddings = kwargs["position_embeddings"]
        if st.substitute is None:  # nothing merged yet: the block runs on the tower's own kwargs
            st.block = {"cu_seqlens": kwargs["cu_seqlens"], "position_embeddings": kwargs["position_embeddings"]}
            return None
        cu, longest = st.substitute["full" if i in self.full_blocks else "window"]
        kwargs["cu_seqlens"] = cu
        if kwargs.get("max_seqlen") is not None:
            kwargs["max_seqlen"] = longest
        kwargs["position_embeddings"] = st.substitute["position_embeddings"]
        st.block = {"cu_seqlens": cu, "position_embeddings": kwargs["position_embeddings"]}
        return args, kwargs

    def _store_qkv(self, i: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        st = self.state.vision
        if isinstance(st, UnitState) and any(s[i] for s in st.schedules):
            self._captured[i] = output

    # -- the merge step --------------------------------------------------------------------------------
    def _merge(self, i: int, x: torch.Tensor) -> torch.Tensor:
        st: UnitState = self.state.vision
        r = [s[i] for s in st.schedules]
        if not any(r):
            return x
        m = self.unit
        with self.timer.span("method"):
            if x.shape[0] != m * st.pos.numel():
                raise RuntimeError(f"prunebench: block {i} got {x.shape[0]} rows for {st.pos.numel()} merge units")
            importance, keys = self._importance(i, x, r), self._keys(i)
            self._captured.pop(i, None)
            counts = torch.bincount(st.part, minlength=len(r)).tolist()
            pieces, kept, sizes, moves, start = [], [], [], [], 0
            for p, n in enumerate(counts):
                rows = x[start * m : (start + n) * m]
                size = st.size[start : start + n]
                if r[p] == 0:
                    pieces.append(rows)
                    kept.append(torch.arange(start, start + n, device=st.pos.device))
                    sizes.append(size)
                else:
                    units = rows.view(n, m, -1)
                    imp = None if importance is None else importance[start * m : (start + n) * m].view(n, m).mean(1)
                    extra = {} if keys is None else {"metric": keys[start * m : (start + n) * m].view(n, m, -1).mean(1)[None]}
                    out = self.method.spec.merge(
                        units.float().mean(1)[None], size[None], st.pos[start : start + n][None],
                        None if imp is None else imp[None], r[p], protect=None, **self.merge_params, **extra)
                    merged = out.merged[0]
                    pieces.append(merge_units(units, size, out.old_to_new[0], merged).flatten(0, 1))
                    kept.append(start + (~merged).nonzero()[:, 0])
                    sizes.append(out.size[0].to(size.dtype))
                    moves.append((start, n, out.old_to_new[0]))
                start += n
            keep = torch.cat(kept)
            st.pos, st.rep, st.part = st.pos[keep], st.rep[keep], st.part[keep]
            st.full, st.window, st.size = st.full[keep], st.window[keep], torch.cat(sizes)
            st.substitute = self._substitutions(st)
        if st.group is not None:  # bookkeeping for the record (`kept.py`), outside the method's span
            st.group = _follow(st.group, sum(counts), keep, moves)
        return torch.cat(pieces)

    def _keys(self, i: int) -> torch.Tensor | None:
        """[S, d] head-mean keys of block i's rows, before the rotary embedding (ToMe's metric)."""
        qkv = self._captured.get(i) if "keys" in self.method.spec.needs else None
        if qkv is None:
            return None
        attn = self.blocks[i].attn
        return head_mean_keys(qkv.reshape(qkv.shape[0], 3, -1)[:, 1], qkv.shape[-1] // (3 * attn.num_heads))

    def _importance(self, i: int, x: torch.Tensor, r: list[int]) -> torch.Tensor | None:
        """[S] attention each row receives within its attention segment at block i (float32), from the
        block's own qkv with the rotary embedding it was given; zeros for parts that do not merge here."""
        if "received_attention" not in self.method.spec.needs:
            return None
        qkv = self._captured.get(i)
        if qkv is None:
            return None
        st: UnitState = self.state.vision
        attn, s = self.blocks[i].attn, x.shape[0]
        q, k, _ = qkv.reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = st.block["position_embeddings"]
        q, k = self._rope[i](q, k, cos, sin)
        out = torch.zeros(s, dtype=torch.float32, device=x.device)
        cu = st.block["cu_seqlens"].tolist()
        part = st.part.tolist()
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            if b > a and r[part[a // self.unit]]:
                out[a:b] = received_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                              attn.scaling)[0]
        return out

    def _substitutions(self, st: UnitState) -> dict:
        m = self.unit
        cos, sin = st.position_embeddings
        rows = (st.pos[:, None] * m + torch.arange(m, device=st.pos.device)).flatten().to(cos.device)

        def cu_of(segment: torch.Tensor) -> tuple[torch.Tensor, int]:
            lengths = torch.unique_consecutive(segment, return_counts=True)[1] * m
            return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32), int(lengths.max())

        return {"full": cu_of(st.full), "window": cu_of(st.window), "position_embeddings": (cos[rows], sin[rows])}

    # -- merger output: back to full length, decision to the LLM entry ------------------------------------
    def _finish(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        st: UnitState = self.state.vision
        full = self._full_length(output)
        self.state.visual_sizes = list(st.n_units)
        self.state.visual_keep = [st.rep[st.part == p].sort().values for p in range(len(st.n_units))]
        if st.group is not None:
            self.state.visual_groups = unit_groups(st)
        self.state.clamped |= st.clamped
        return full

    def _full_length(self, output: torch.Tensor) -> torch.Tensor:
        """A merger's output over the units alive now -> all units of the call (zeros at units merged away)."""
        st: UnitState = self.state.vision
        if output.shape[0] != st.pos.numel():
            raise RuntimeError(f"vision merge left {st.pos.numel()} merge units but the merger gave {output.shape[0]}")
        full = output.new_zeros(st.n_total, *output.shape[1:])
        full[st.pos.to(output.device)] = output
        return full


def _follow(group: torch.Tensor, n: int, keep: torch.Tensor,
            moves: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """One block's merges applied to group [U0] (index of the unit holding each entry unit, among the n units
    before the block): keep [U'] the surviving indices, in order; moves: (start, count, old_to_new [count]) of
    each part that merged (old_to_new: the new index within the part; a merged unit: its destination's)."""
    new = torch.full((n,), -1, dtype=torch.long, device=keep.device)
    new[keep] = torch.arange(keep.numel(), device=keep.device)
    for start, count, old_to_new in moves:
        new[start : start + count] = int((keep < start).sum()) + old_to_new.to(new.device)
    return new[group]


def unit_groups(st: UnitState) -> list[torch.Tensor]:
    """Per part: for each of its units (raster index), the raster index of the unit holding it."""
    rep, part = st.origin
    out = []
    for p, n in enumerate(st.n_units):
        mine = part == p
        into = torch.empty(n, dtype=torch.long, device=rep.device)
        into[rep[mine]] = st.rep[st.group[mine]]
        out.append(into)
    return out
