"""Vision-side seams: merges inside the encoder layers, and the projector output (pre-LLM).

Both end in the same decision, `state.visual_keep` (per image, the indices of the visual tokens
that stay), which the LLM entry (`stages/llm.py`) applies. The visual tokens are handed on at
full length so the family's own scatter into `inputs_embeds` keeps working; the dropped rows
never reach the first decoder layer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from prunebench.errors import UserError
from prunebench.methods.base import ResolvedMethod, SelectContext, Selection, n_keep_for
from prunebench.methods.tome_ops import head_mean_keys, proportional_bias
from prunebench.seams import Seams
from prunebench.stages.attention import received_attention
from prunebench.stages.patches import ClassSwaps, MethodWrap
from prunebench.stages.state import CallState
from prunebench.stages.text import text_embeddings, unit_batch_rows
from prunebench.stages.vision_signals import VISION_SIGNALS, VisionSignals
from prunebench.timing import Timer


@dataclass
class MergeState:
    """Per-image merge bookkeeping: size [B, T] (ToMe sizes), rep [B, T] (original patch index
    each token stands for, -1 for prefix tokens like [CLS]); group [B, T0]: for each token of the
    encoder's input, the index of the current token holding it (None: not tracked)."""

    size: torch.Tensor
    rep: torch.Tensor
    group: torch.Tensor | None = None


class PreLLMSelect:
    """A select method on the visual tokens in LLM space, one image at a time (budget per image).

    Tokens the family marks as always kept (LLaVA-NeXT's row newlines) are not candidates and do
    not count towards the budget: n_keep = round(keep * (N_i - always kept)).
    """

    def __init__(self, seams: Seams, method: ResolvedMethod, keep: float, state: CallState, timer: Timer,
                 generator: torch.Generator) -> None:
        if "grid" in method.spec.needs and seams.always_keep is not None:
            raise UserError(f"{method.name} needs the visual tokens to form a grid: not supported on the "
                            f"{seams.family} family (it packs them with newline tokens)")
        self.seams, self.method, self.keep, self.state = seams, method, keep, state
        self.timer, self.generator = timer, generator
        self._groups: list[torch.Tensor | None] = []  # per unit of the last selection: its merge groups, or None
        # The text is embedded after this seam: text-conditioned methods select at the LLM entry.
        self.deferred = "text_embeddings" in method.spec.needs
        self._pending: list[tuple[torch.Tensor, tuple[int, int] | None, dict[str, torch.Tensor]]] = []
        self.signals = (seams.vision_signals or VisionSignals)(seams, method, timer) \
            if VISION_SIGNALS & method.spec.needs else None

    def register(self) -> list:
        handles = self.signals.register() if self.signals is not None else []
        if self.seams.visual_fns:
            return handles + [MethodWrap(self.seams.multimodal, name, functools.partial(self._hook, split=split))
                    for name, split in self.seams.visual_fns.items()]
        return handles + [self.seams.visual_output.register_forward_hook(self._hook, with_kwargs=True)]

    def _hook(self, module: object, args: tuple, kwargs: dict, output: object, split: object = None) -> None:
        tokens = (split or self.seams.split_visual)(args, kwargs, output)
        grids = self.seams.visual_grids(args, kwargs, tokens)
        self.state.visual_sizes = (self.state.visual_sizes or []) + [x.shape[0] for x in tokens]
        signals = self.signals.take(len(tokens)) if self.signals is not None else [{}] * len(tokens)
        # in a batch of several samples, the rows of the units are known only at the LLM entry
        if self.deferred or len(self.state.row_seeds) > 1:
            self._pending += list(zip(tokens, grids, signals, strict=True))
            self.state.select_at_entry = self._select_at_entry
            return
        with self.timer.span("method"):
            keeps, values = self._select_each(zip(tokens, grids, signals, strict=True), len(tokens))
        self._hand_on(keeps, values)

    def _select_each(self, units: Iterable[tuple[torch.Tensor, tuple[int, int] | None, dict[str, torch.Tensor]]],
                     n_units: int, at_entry: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """(tokens [N, D], grid, signals) per image -> its kept indices and new values (None: unchanged).
        In a batch (selected at the LLM entry), the random stream restarts at each row's first unit from that
        row's seed, so a sample's picks do not depend on the batch it runs in."""
        keeps, values, self._groups = [], [], []
        rows = self._unit_rows(n_units) if at_entry else None
        for u, (x, grid, sig) in enumerate(units):
            if rows is not None and (u == 0 or rows[u] != rows[u - 1]):
                self.generator.manual_seed(self.state.row_seeds[rows[u]])
            kept, new = self._select(x, grid, sig)
            keeps.append(kept)
            values.append(new)
        return keeps, values

    def _unit_rows(self, n_units: int) -> list[int] | None:
        """The batch row of each of the last n_units visual units, when a batch of several samples runs (at
        the LLM entry: generation runs the visual seam before the multimodal forward sees `input_ids`)."""
        if len(self.state.row_seeds) <= 1:
            return None
        return unit_batch_rows(self.state.image_mask, self.state.visual_sizes or [])[-n_units:]

    def _hand_on(self, keeps: list[torch.Tensor], values: list[torch.Tensor | None]) -> None:
        self.state.visual_keep = (self.state.visual_keep or []) + keeps
        self.state.visual_values = (self.state.visual_values or []) + values
        groups, self._groups = self._groups, []
        if groups and all(g is not None for g in groups):  # a merging method's groups, for the record (`kept.py`)
            self.state.visual_groups = (self.state.visual_groups or []) + groups

    def _select_at_entry(self, embeds: torch.Tensor, mask2d: torch.Tensor | None) -> None:
        """At the LLM entry: select each pending image's tokens given its prompt's text."""
        pending, self._pending = self._pending, []
        image_mask = self.state.image_mask
        if image_mask is None or image_mask.shape != embeds.shape[:2]:
            raise RuntimeError("prunebench: image-token positions unknown at the LLM entry (pass input_ids)")
        with self.timer.span("method"):
            if not self.deferred:  # deferred for the batch rows only: no text
                keeps, values = self._select_each(iter(pending), len(pending), at_entry=True)
                self._hand_on(keeps, values)
                return
            texts = text_embeddings(embeds, image_mask, mask2d, [x.shape[0] for x, _, _ in pending])
            keeps, values = self._select_each(
                ((x, grid, {**sig, "text_embeddings": text.to(x.device)})
                 for (x, grid, sig), text in zip(pending, texts, strict=True)), len(pending), at_entry=True)
        self._hand_on(keeps, values)

    def _select(self, x: torch.Tensor, grid: tuple[int, int] | None,
                signals: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, D] and its signals (per token [N, ...], or per image like the text [1, M, D]) -> (sorted
        indices of the kept rows, their new values or None)."""
        if "grid" in self.method.spec.needs and grid is None:
            raise ValueError(f"{self.method.name} needs the visual tokens of an image to form a grid")
        fixed = self.seams.always_keep(x) if self.seams.always_keep else None
        candidates = torch.arange(x.shape[0], device=x.device)
        if fixed is not None:
            candidates = candidates[~fixed]
            if candidates.numel() == 0:  # e.g. a video's closing newline, reported on its own
                self.state.fixed += int(fixed.sum())
                self.state.unit_clamped.append(False)
                self.state.unit_fixed.append(int(fixed.sum()))
                self._groups.append(torch.arange(x.shape[0], device=x.device))  # all kept, each its own
                return fixed.nonzero()[:, 0], None
        n_keep, clamped = n_keep_for(self.keep, candidates.numel())
        self.state.clamped |= clamped
        self.state.unit_clamped.append(clamped)
        self.state.unit_fixed.append(0 if fixed is None else int(fixed.sum()))
        per_token = {k: v.to(x.device) for k, v in signals.items() if k in VISION_SIGNALS}
        for name, value in per_token.items():
            if value.shape[0] != x.shape[0]:
                raise RuntimeError(f"prunebench: {name} has {value.shape[0]} rows for {x.shape[0]} visual tokens")
        signals = {**signals, **{k: v[candidates][None] for k, v in per_token.items()}}
        ctx = SelectContext(tokens=x[candidates][None], n_keep=n_keep, grid=grid, generator=self.generator,
                            signals=signals)
        out = self.method.spec.fn(ctx, **self.method.params)
        index, new = (out.index, out.tokens) if isinstance(out, Selection) else (out, None)
        kept = candidates[index[0].to(x.device)]
        groups = out.groups if isinstance(out, Selection) else None
        if groups is not None:  # each unit token -> the unit token holding it (-1: dropped unmerged)
            g = groups[0].to(x.device)
            into = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
            into[candidates] = torch.where(g >= 0, candidates[g.clamp(min=0)], -1)
            if fixed is not None:
                into[fixed] = fixed.nonzero()[:, 0]
            groups = into
        self._groups.append(groups)
        if new is not None:
            new = new[0]
        if fixed is not None:
            order = torch.cat([kept, fixed.nonzero()[:, 0]]).sort()
            kept = order.values
            if new is not None:
                new = torch.cat([new, x[fixed]])[order.indices]
            self.state.fixed += int(fixed.sum())
        return kept, new


class VisionMerge:
    """A merge method applied inside encoder layers, between attention and MLP (EvoPrune Alg. 1)."""

    def __init__(self, seams: Seams, method: ResolvedMethod, keep: float, state: CallState, timer: Timer) -> None:
        if seams.merge_layer_class is None or seams.vision_grid is None:
            raise UserError(f"{method.name}: vision-stage merges are not supported on the {seams.family} family yet")
        self.seams, self.method, self.state, self.timer = seams, method, state, timer
        n_in = seams.n_vision_patches
        base = seams.vision_budget_base or n_in
        self.n_keep, self.clamped = n_keep_for(keep, base)
        # A family that reduces the patches itself (pooling) merges only when keep asks for fewer
        # tokens than that reduction gives: keep=1.0 leaves the encoder untouched.
        n_remove = 0 if self.n_keep >= base else n_in - self.n_keep
        self.active = n_remove > 0
        self.merge_point = str(method.params.get("merge_point", "attention"))
        if self.merge_point not in ("attention", "layer"):
            raise UserError(f"{method.name}: merge_point must be one of: attention, layer (got '{self.merge_point}')")
        self.merge_params = merge_params(method)
        self.prop_attn = bool(method.params.get("prop_attn", False))
        self.notes: list[str] = []
        try:
            self.schedule = method.spec.schedule(
                str(method.params["schedule"]), len(seams.vision_layers), n_in, n_remove
            )
        except ValueError as err:  # e.g. more merges asked than this encoder's layers can make
            raise UserError(f"{method.name}: {err}") from None
        self.swaps = ClassSwaps()

    def register(self) -> list[torch.utils.hooks.RemovableHandle]:
        s = self.seams
        handles = [s.vision_tower.register_forward_pre_hook(self._start, with_kwargs=True)]
        if s.vision_hand_on is not None:
            handles += s.vision_hand_on(self)
        else:
            handles.append(s.visual_output.register_forward_hook(self._finish))
        if self.prop_attn and self.active:
            handles += [layer.register_forward_pre_hook(self._size_bias, with_kwargs=True) for layer in s.vision_layers]
        needs = self.method.spec.needs
        for layer, r in zip(s.vision_layers, self.schedule, strict=True):
            if r == 0:
                continue
            captured: dict[str, torch.Tensor] = {}
            if "received_attention" in needs:
                handles.append(layer.self_attn.q_proj.register_forward_hook(capture_output(captured, "q")))
            if needs & {"received_attention", "keys"}:
                handles.append(layer.self_attn.k_proj.register_forward_hook(capture_output(captured, "k")))
            step = _MergeStep(self, layer, r, captured)
            if self.merge_point == "layer":  # between layers: on the layer's output, after its MLP
                # prepend: run before transformers' own hooks that record hidden_states
                handles.append(layer.register_forward_hook(lambda m, a, out, step=step: step(out), prepend=True))
                continue
            self.swaps.swap(layer, s.merge_layer_class, step)  # inside the layer, between attention and MLP
        return handles

    def restore(self) -> None:
        self.swaps.restore()

    def _size_bias(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """ToMe proportional attention: log(size) as the layer's additive attention mask, once tokens
        have merged (before that every size is 1 and the layer runs untouched)."""
        merge: MergeState = self.state.vision
        if not isinstance(merge, MergeState) or bool((merge.size == 1).all()):
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        bias = proportional_bias(merge.size, hidden.dtype)
        if len(args) > 1:
            mask = args[1]
            return (args[0], bias if mask is None else mask + bias, *args[2:]), kwargs
        mask = kwargs.get("attention_mask")
        kwargs["attention_mask"] = bias if mask is None else mask + bias
        return args, kwargs

    def _start(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        b, prefix, n = pixels.shape[0], self.seams.vision_prefix, self.seams.n_vision_patches
        rep = torch.cat([torch.full((prefix,), -1), torch.arange(n)]).to(pixels.device)
        self.state.vision = MergeState(size=torch.ones(b, prefix + n, device=pixels.device),
                                       rep=rep.expand(b, -1).clone(), group=torch.arange(prefix + n, device=pixels.device).expand(b, -1))

    def _finish(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        merge: MergeState = self.state.vision
        keep = merge.rep[:, self.seams.vision_prefix :]
        if keep.shape[1] != output.shape[1]:
            raise RuntimeError(f"vision merge left {keep.shape[1]} patch tokens but the projector saw {output.shape[1]}")
        # Hand the projector output on at full grid length (the family's scatter expects it);
        # the LLM entry drops the rows that were merged away.
        full = output.new_zeros(output.shape[0], self.seams.n_vision_patches, output.shape[-1])
        full.scatter_(1, keep[..., None].expand(-1, -1, output.shape[-1]), output)
        self.state.visual_sizes = [self.seams.n_vision_patches] * output.shape[0]
        self.state.visual_keep = list(keep)
        if merge.group is not None:  # each patch -> the patch its token stands for (the token it merged into)
            into = merge.rep.gather(1, merge.group)[:, self.seams.vision_prefix :]
            self.state.visual_groups = list(into) if bool((into >= 0).all()) else None
        self.state.clamped |= self.clamped
        return full


class _MergeStep:
    """Called by the swapped encoder layer with the post-attention residual stream [B, T, D]."""

    def __init__(self, owner: VisionMerge, layer: torch.nn.Module, r: int, captured: dict[str, torch.Tensor]) -> None:
        self.owner, self.layer, self.r, self.captured = owner, layer, r, captured

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        owner = self.owner
        state: MergeState = owner.state.vision
        needs = owner.method.spec.needs
        with owner.timer.span("method"):
            importance = self._received_attention(x.shape[0], x.shape[1]) if "received_attention" in needs else None
            extra = {"metric": head_mean_keys(self.captured.pop("k"), self.layer.self_attn.head_dim)} \
                if "keys" in needs else {}
            protect = state.rep < 0
            out = owner.method.spec.merge(x, state.size, state.rep, importance, self.r, protect=protect,
                                          **owner.merge_params, **extra)
        # bookkeeping for the record (`kept.py`), outside the method's span
        group = None if state.group is None else out.old_to_new.gather(1, state.group)
        owner.state.vision = MergeState(size=out.size, rep=out.rep, group=group)
        return out.x

    def _received_attention(self, b: int, t: int) -> torch.Tensor:
        """[B, T] mean attention each token receives, from this layer's own q/k (no eager attention)."""
        attn = self.layer.self_attn
        q = self.captured.pop("q").view(b, t, -1, attn.head_dim).transpose(1, 2)
        k = self.captured.pop("k").view(b, t, -1, attn.head_dim).transpose(1, 2)
        return received_attention(q, k, attn.scale)


def merge_params(method: ResolvedMethod) -> dict:
    """The hyper-parameters a merge step takes: all but the stage-level ones."""
    return {k: v for k, v in method.params.items() if k not in ("schedule", "merge_point", "prop_attn")}


def unapplied_prop_attn(method: ResolvedMethod, family: str, why: str) -> list[str]:
    """Install notes for a family whose encoder cannot take ToMe's proportional attention bias."""
    if not method.params.get("prop_attn", False):
        return []
    return [f"{method.name}: proportional attention not applied on the {family} family ({why})"]


def capture_output(captured: dict[str, torch.Tensor], name: str):
    """A forward hook keeping a module's output under `name` (q/k projections for attention rows)."""
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured[name] = output

    return hook
