"""LLM-side seams: the LLM entry (where pre-LLM and vision-stage decisions shorten the
sequence) and layer K, or layers K_1 < K_2 < ... (intra-LLM methods).

Both are forward pre-hooks with kwargs on the model instance; no modeling file is forked and
attention stays SDPA/Flash. Decode steps are fixed up in the same hooks: the 2-D padding mask
loses the dropped columns, and positions follow the method's policy (original positions with
gaps, or closed up).
"""

from __future__ import annotations

from typing import Any

import torch

from prunebench.errors import UserError
from prunebench.methods.base import (
    Insertion,
    Positions,
    ResolvedMethod,
    SelectContext,
    layer_average,
    n_keep_for,
)
from prunebench.methods.sparsevlm_ops import select_raters
from prunebench.seams import Seams
from prunebench.stages.attention import (
    last_query_attention,
    position_query_attention,
    query_rows_attention,
    rope_prior,
    rows_attention_per_head,
)
from prunebench.stages.state import CallState, Compaction, TokenCounts, padded_rows, renumber, rows_of
from prunebench.stages.text import unit_batch_rows
from prunebench.timing import Timer

Kwargs = dict[str, Any]

# Signals recomputed from layer K-1's captured q/k (and rotary embeddings).
CAPTURED_SIGNALS = frozenset({"last_query_attention", "last_visual_query_attention", "rater_attention", "layer_keys"})


def capture_image_positions(seams: Seams, state: CallState):
    """Pre-hook on the multimodal module: remember where the visual tokens of a prompt are, and
    count them (a later stage overwrites the counts with what it kept)."""
    ids = torch.tensor(seams.image_token_ids)

    def hook(module: torch.nn.Module, args: tuple, kwargs: Kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and input_ids.shape[1] > 1:
            state.mixed = sum(bool((input_ids == i).any()) for i in seams.image_token_ids) > 1
            state.image_mask = torch.isin(input_ids, ids.to(input_ids.device))
            state.prompt_image_mask = state.image_mask  # never changed in place (later masks are new tensors)
            state.row_counts = [TokenCounts(n, n, float(n)) for n in state.image_mask.sum(dim=1).tolist()]
            state.counts = state.row_counts[0]

    return hook


def _past_length(kwargs: Kwargs) -> int:
    cache = kwargs.get("past_key_values")
    return int(cache.get_seq_length()) if cache is not None else 0


def llm_entry(state: CallState, positions: Positions):
    """Pre-hook on the language model: drop the visual rows the earlier stage did not keep."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: Kwargs) -> tuple[tuple, Kwargs] | None:
        embeds = kwargs["inputs_embeds"]
        mask2d = kwargs.get("attention_mask")
        if _past_length(kwargs) == 0:
            state.phase = "prefill"
            state.new_prompt()
            if state.select_at_entry is not None:  # text-conditioned pre-LLM methods select now
                select, state.select_at_entry = state.select_at_entry, None
                select(embeds, mask2d)
            if state.visual_keep is None:  # nothing decided before the LLM (or keep=1.0 installed nothing)
                state.attention_mask_2d = mask2d
                state.stage_counts["entry"] = state.counts
                return None
            return args, _compact_entry(state, kwargs, embeds, mask2d, positions)
        state.phase = "decode"
        if state.entry is None:
            return None
        return args, _decode_entry(state.entry, kwargs, embeds, mask2d)

    return hook


def _compact_entry(
    state: CallState, kwargs: Kwargs, embeds: torch.Tensor, mask2d: torch.Tensor | None, positions: Positions
) -> Kwargs:
    b, length, _ = embeds.shape
    if state.image_mask is None or state.image_mask.shape != (b, length):
        raise RuntimeError("prunebench: image-token positions unknown at the LLM entry (pass input_ids)")
    if state.mixed:  # the visual seams report images and videos separately, not in sequence order
        raise RuntimeError("prunebench: pruning before the LLM does not support prompts mixing images and videos")
    keep = ~state.image_mask
    flat = state.image_mask.flatten().nonzero()[:, 0]  # visual rows in masked_scatter order
    sizes = state.visual_sizes or []
    if flat.numel() != sum(sizes):
        raise RuntimeError(f"prunebench: {flat.numel()} visual placeholders but the visual seam gave {sum(sizes)}")
    kept = [rows[k.to(rows.device)] for rows, k in zip(flat.split(sizes), state.visual_keep, strict=True)]
    keep.view(-1)[torch.cat(kept)] = True
    embeds = _with_new_values(embeds, kept, state.visual_values)
    # rows of the batch may keep different counts (per-sample budgets, adaptive methods): left-padded again
    real = keep if mask2d is None else keep & mask2d.bool()
    index, pad = padded_rows(real)
    if state.visual_protect is not None:  # the vision stage's protected tokens, as rows of the compacted sequence
        protected = torch.zeros_like(keep).view(-1)
        for rows, p in zip(kept, state.visual_protect, strict=True):
            protected[rows[p.to(rows.device)]] = True
        state.protected = protected.view_as(keep).gather(1, index)
        state.visual_protect = None
    state.row_counts = _entry_counts(state, keep, sizes)
    state.counts = state.row_counts[0]
    state.stage_counts["entry"] = state.counts
    state.clamped, state.fixed = False, 0
    state.unit_clamped, state.unit_fixed = [], []
    if state.visual_groups is not None:  # read after generation (`kept.py`), outside the timed region
        state.merge_groups, state.visual_groups = (state.visual_groups, sizes), None
    state.visual_sizes = state.visual_values = None
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.arange(length, device=embeds.device).expand(b, length)
    new_pos = renumber(keep, pos.expand(*pos.shape[:-2], b, length), index, positions)
    shift: int | torch.Tensor = 0
    if positions is Positions.CONTIGUOUS:  # what each row dropped
        dropped = (~keep).sum(dim=1, keepdim=True)
        shift = int(dropped[0]) if bool((dropped == dropped[0]).all()) else dropped
    state.entry = Compaction(index=index, full_len=length, position_ids=new_pos, shift=shift, pad=pad)
    state.image_mask = state.image_mask.gather(1, index)
    if pad is not None:
        state.image_mask &= ~pad
    state.visual_keep = None
    kwargs["inputs_embeds"] = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
    kwargs["position_ids"] = new_pos
    if mask2d is not None:
        kwargs["attention_mask"] = _padded_mask(mask2d.gather(1, index), pad)
    elif pad is not None:
        kwargs["attention_mask"] = (~pad).long()
    state.attention_mask_2d = kwargs.get("attention_mask")
    return kwargs


def _padded_mask(mask2d: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    return mask2d if pad is None else mask2d.masked_fill(pad.to(mask2d.device), 0)


def _entry_counts(state: CallState, keep: torch.Tensor, sizes: list[int]) -> list[TokenCounts]:
    """Per batch row: visual tokens in and reaching the LLM, clamped, kept outside the budget. A stage that keeps
    tokens outside the budget (a select stage, a packing family's vision hand-on) reports clamped / fixed per
    visual unit, mapped here to the unit's row; a stage that reports neither per unit keeps none outside it."""
    image = state.image_mask
    n_in = image.sum(dim=1).tolist()
    n_out = (keep & image).sum(dim=1).tolist()
    clamped, fixed = [state.clamped] * len(n_in), [state.fixed] + [0] * (len(n_in) - 1)
    if len(n_in) > 1 and len(state.unit_clamped) == len(sizes):
        clamped, fixed = [False] * len(n_in), [0] * len(n_in)
        for row, c, f in zip(unit_batch_rows(image, sizes), state.unit_clamped, state.unit_fixed, strict=True):
            clamped[row] |= c
            fixed[row] += f
    elif len(n_in) > 1 and state.fixed:
        raise RuntimeError("prunebench: tokens kept outside the budget were not reported per visual unit")
    return [TokenCounts(i, o, float(o), c, f) for i, o, c, f in zip(n_in, n_out, clamped, fixed, strict=True)]


def _with_new_values(embeds: torch.Tensor, kept: list[torch.Tensor], values: list | None) -> torch.Tensor:
    """Write the new values of pooled / merged visual tokens at their kept rows (flat [B*L] rows)."""
    if not values or all(v is None for v in values):
        return embeds
    flat = embeds.reshape(-1, embeds.shape[-1]).clone()
    for rows, new in zip(kept, values, strict=True):
        if new is not None:
            flat[rows] = new.to(flat)
    return flat.view_as(embeds)


def _decode_entry(entry: Compaction, kwargs: Kwargs, embeds: torch.Tensor, mask2d: torch.Tensor | None) -> Kwargs:
    if mask2d is not None:  # [B, full_len + t] -> [B, kept + t]
        head = _padded_mask(mask2d[:, : entry.full_len].gather(1, entry.index), entry.pad)
        kwargs["attention_mask"] = torch.cat([head, mask2d[:, entry.full_len :]], dim=1)
    pos = kwargs.get("position_ids")
    if pos is not None:
        kwargs["position_ids"] = pos - entry.shift
    elif isinstance(entry.shift, int) and entry.shift == 0:  # original positions: continue after the full prompt
        past = _past_length(kwargs)
        dropped = entry.full_len - entry.index.shape[1]
        start = past + dropped
        kwargs["position_ids"] = torch.arange(start, start + embeds.shape[1], device=embeds.device)[None]
    return kwargs


def intra_layers_checked(method: ResolvedMethod, keep: float, n_layers: int) -> list[int]:
    """The decoder layers an intra-LLM method prunes at on an n_layers LLM, or one line saying why not (also
    called before the model loads, with the layer count from its config)."""
    # K from keep (VTW): 0..L-1, or no layer at all when the operating point K = L withdraws nothing
    layers = method.spec.intra_layers(n_layers, method.params, keep)
    low = 0 if method.spec.layer_for_keep is not None else 1
    if not CAPTURED_SIGNALS.isdisjoint(method.spec.needs):
        low = 1  # the signals come from layer K-1
    if not all(low <= k < n_layers for k in layers) or sorted(set(layers)) != layers:
        what = "layer must be" if len(layers) == 1 else "layers must be increasing and"
        got = layers[0] if len(layers) == 1 else layers
        raise UserError(f"{method.name}: {what} in {low}..{n_layers - 1} for this model "
                        f"({n_layers} decoder layers), got {got}")
    return layers


class IntraLLM:
    """Prune visual tokens inside the LLM at layer K = method.params['layer'], or at the ordered layers
    K_1 < K_2 < ... of a multi-layer method (MethodSpec.intra: PyramidDrop, SparseVLM, MustDrop).

    Stage s prunes the visual tokens that survived stage s-1, entering layer K_s. Every stage's
    `Compaction` is composed into one index over the sequence that entered the LLM, so the layers of
    stage s get that sequence's positions / RoPE / 4-D mask gathered once, and a decode step at a
    layer of stage s drops the same cache columns and shifts positions by what stage s dropped.
    A stage may insert tokens (SparseVLM's recycled clusters: `Compaction.inserted`); a final-cache
    method (MustDrop) has the caches of layers K_1-1 .. K_S-1 cut to the final set after prefill.
    """

    def __init__(self, seams: Seams, method: ResolvedMethod, keep: float, positions: Positions, state: CallState,
                 timer: Timer, generator: torch.Generator) -> None:
        self.seams, self.method, self.keep, self.positions, self.state = seams, method, keep, positions, state
        self.timer, self.generator = timer, generator
        self.flags: list[str] = []  # `budget unreachable` lines (the installation shares its list)
        if "grid" in method.spec.needs and (seams.vision_grid is None or seams.always_keep is not None):
            # packed any-resolution tokens (LLaVA-NeXT / OneVision: base + tiles + newlines) or dynamic
            # resolution (Qwen, InternVL tiles) have no single h x w layout inside the LLM
            raise UserError(f"{method.name} needs the visual tokens to form a grid: not supported on the "
                            f"{seams.family} family (its visual tokens reach the LLM packed or at dynamic resolution)")
        n_layers = len(seams.decoder_layers)
        self.layers = intra_layers_checked(method, keep, n_layers)
        self.k = self.layers[0] if self.layers else n_layers
        self._n_entry = [0]  # per batch row: visual tokens entering layer K_1 in the current prompt
        self.multi = method.spec.intra is not None
        self.final_cache = self.multi and method.spec.intra.final_cache

    def register(self) -> list[torch.utils.hooks.RemovableHandle]:
        layers = self.seams.decoder_layers
        if not self.layers:  # the operating point prunes nothing: the unpruned model
            return []
        first = self.k - 1 if self.final_cache else self.k  # MustDrop: decode from layer K_1-1 on is pruned too
        handles = [layers[j].register_forward_pre_hook(self._hook(j), with_kwargs=True)
                   for j in range(first, len(layers))]
        if self.final_cache:
            handles.append(self.seams.language_model.register_forward_hook(self._final_cache, with_kwargs=True))
        if not {"raters", "rater_attention"}.isdisjoint(self.method.spec.needs):
            handles.append(layers[0].register_forward_pre_hook(self._raters, with_kwargs=True))
        if not CAPTURED_SIGNALS.isdisjoint(self.method.spec.needs):
            # after the stage hooks: a capture layer inside a pruned span sees the substituted RoPE
            for k in self.layers:
                handles += self._register_capture(layers[k - 1])
        return handles

    def _stage_of(self, j: int, decode: bool = False) -> int:
        """Index of the stage in force at decoder layer j (>= K_1, or K_1-1 for a final-cache decode)."""
        if decode and self.final_cache:
            return len(self.layers) - 1
        return max(s for s, k in enumerate(self.layers) if k <= j)

    def _final_cache(self, module: torch.nn.Module, args: tuple, kwargs: Kwargs, output: Any) -> None:
        """After prefill: the caches of layers K_1-1 .. K_S-1 keep only the final visual set (MustDrop
        `LlamaDynamicvitModel.forward`, "Sparse kv cache (decoding stage)")."""
        stages = self.state.intra_stages
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        if self.state.phase != "prefill" or cache is None or not stages or stages[-1] is None:
            return
        final = stages[-1]
        for j in range(self.k - 1, self.layers[-1]):
            held = self._in_force(self._stage_of(j)) if j >= self.k else None  # the rows layer j cached
            if held is final:
                continue
            layer = cache.layers[j]
            rows = final.index if held is None else torch.searchsorted(held.index, final.index)
            at = rows[:, None, :, None].to(layer.keys.device)
            layer.keys = layer.keys.gather(2, at.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, at.expand(-1, layer.values.shape[1], -1, layer.values.shape[-1]))

    # -- signals -------------------------------------------------------------------------
    def _register_capture(self, layer: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        caps = self.state.captures

        decoder = self.seams.decoder

        def keep_output(name: str):
            def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
                if self.state.phase == "prefill":
                    caps[name] = decoder.flat(output)

            return hook

        def keep_rope(module: torch.nn.Module, args: tuple, kwargs: Kwargs) -> None:
            if self.state.phase == "prefill":
                caps["rope"] = kwargs["position_embeddings"]

        q_module, k_module = decoder.qk_modules(layer)
        return [
            layer.register_forward_pre_hook(keep_rope, with_kwargs=True),
            q_module.register_forward_hook(keep_output("q")),
            k_module.register_forward_hook(keep_output("k")),
        ]

    def _raters(self, module: torch.nn.Module, args: tuple, kwargs: Kwargs) -> None:
        """Layer 0 pre-hook: the text after the last visual token (its length), and SparseVLM's text
        raters among it from the LLM input embeddings (scored against the visual tokens)."""
        mask = self.state.image_mask
        if self.state.phase != "prefill" or mask is None or not bool(mask.any()):
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        last = int(mask[0].nonzero()[-1, 0])
        tail = hidden.shape[1] - 1 - last
        if tail == 0:  # no text after the image: the last (visual) token rates alone
            self.state.text_tail = 1
            self.state.raters = torch.ones(hidden.shape[0], 1, dtype=torch.bool, device=hidden.device)
            return
        self.state.text_tail = tail
        if "raters" not in self.method.spec.needs:
            return
        rows = rows_of(mask)
        visual = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
        self.state.raters = select_raters(visual, hidden[:, last + 1 :])

    def _signals(self, k: int, image_rows: torch.Tensor, hidden: torch.Tensor, kwargs: Kwargs
                 ) -> dict[str, torch.Tensor]:
        """The signals the method needs at layer k; image_rows [B, N], hidden [B, L, D] entering layer k,
        kwargs: layer k's, already substituted for the sequence it sees."""
        needs = self.method.spec.needs
        out = self._row_signals(image_rows, hidden)
        mask = self.state.attention_mask_2d
        key_mask = None if mask is None else mask.bool()
        if "layer_last_query_attention" in needs:
            out["layer_last_query_attention"] = self._own_last_row(k, hidden, kwargs, key_mask).gather(1, image_rows)
        if CAPTURED_SIGNALS.isdisjoint(needs):
            return out
        caps, attn = self.state.captures, self.seams.decoder.attention(self.seams.decoder_layers[k - 1])
        cos, sin = caps["rope"]
        if "layer_keys" in needs:  # DART: heads concatenated, as its `any_states.permute(0, 2, 1, 3)`
            b, length, _ = caps["k"].shape
            keys = self.seams.apply_rope(caps["k"].view(b, length, -1, attn.head_dim).transpose(1, 2), cos, sin)
            out["layer_keys"] = keys.transpose(1, 2).reshape(b, length, -1)
        common = dict(head_dim=attn.head_dim, scale=attn.scaling, apply_rope=self.seams.apply_rope, key_mask=key_mask)
        if "last_query_attention" in needs:
            row = last_query_attention(caps["q"], caps["k"], cos, sin, **common)
            out["last_query_attention"] = row.gather(1, image_rows)
        if "last_visual_query_attention" in needs:  # FastV_VIS: the row of the last visual token
            row = position_query_attention(caps["q"], caps["k"], cos, sin, image_rows[:, -1], **common)
            out["last_visual_query_attention"] = row.gather(1, image_rows)
        if "rater_attention" in needs:
            out.update(self._rater_signals(caps, cos, sin, image_rows, common))
        caps.clear()
        return out

    def _row_signals(self, image_rows: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Signals read off the hidden states entering the layer; image_rows [B, N], hidden [B, L, D]."""
        needs, out = self.method.spec.needs, {}
        if "last_token_hidden" in needs:
            out["last_token_hidden"] = hidden[:, -1]
        if "normed_hidden" in needs:  # DART: `self.norm(last_layer_state)`
            out["normed_hidden"] = self.seams.decoder.final_norm(self.seams.language_model)(hidden)
        if "visual_rows" in needs:
            out["visual_rows"] = image_rows
        if "sequence_index" in needs:  # DART's set of pivot indices: the unpadded index, as batch 1 has it
            mask = self.state.attention_mask_2d
            b, length = hidden.shape[:2]
            out["sequence_index"] = torch.arange(length, device=hidden.device).expand(b, length) if mask is None \
                else mask.long().cumsum(dim=1).to(hidden.device) - 1
        if "key_set" in needs:  # rows a vision stage protects (none: keep=1.0, or no vision stage ran)
            protected = self.state.protected
            out["key_set"] = torch.zeros_like(image_rows, dtype=torch.bool) if protected is None \
                else protected.gather(1, image_rows)
        if "text_after_visual" in needs:
            rows = torch.arange(hidden.shape[1], device=hidden.device)[None]
            after = rows > image_rows[:, -1:]
            mask = self.state.attention_mask_2d
            out["text_after_visual"] = after if mask is None else after & mask.bool().to(after.device)
        return out

    def _rater_signals(self, caps: dict, cos: torch.Tensor, sin: torch.Tensor, image_rows: torch.Tensor,
                       common: dict) -> dict[str, torch.Tensor]:
        b, length = caps["k"].shape[:2]
        tail = self.state.text_tail
        text = torch.arange(length - tail, length, device=image_rows.device).expand(b, tail)
        rows = rows_attention_per_head(caps["q"], caps["k"], cos, sin, text, **common)  # [B, H, T, L]
        out = {"rater_attention": rows.gather(3, image_rows[:, None, None, :].expand(-1, rows.shape[1], tail, -1))}
        if "raters" in self.method.spec.needs:
            out["raters"] = self.state.raters
        if "rope_prior" in self.method.spec.needs:
            out["rope_prior"] = rope_prior(cos, sin, text, image_rows, scale=common["scale"],
                                           apply_rope=self.seams.apply_rope)
        return out

    def _own_last_row(self, k: int, hidden: torch.Tensor, kwargs: Kwargs, key_mask: torch.Tensor | None
                      ) -> torch.Tensor:
        """PyramidDrop's row: layer k's input_layernorm + q (last token) / k projections + RoPE on the
        hidden states entering k; head-mean softmax over all keys: [B, L]."""
        layer = self.seams.decoder_layers[k]
        q, keys = self.seams.decoder.queries_keys(layer, hidden, slice(-1, None))
        attn = self.seams.decoder.attention(layer)
        cos, sin = kwargs["position_embeddings"]
        q = self.seams.apply_rope(q, cos[:, -1:], sin[:, -1:])
        keys = self.seams.apply_rope(keys, cos, sin)
        return query_rows_attention(q, keys, attn.scaling, key_mask)[:, 0]

    # -- hooks ---------------------------------------------------------------------------
    def _hook(self, j: int):
        stage = self.layers.index(j) if j in self.layers else None

        def hook(module: torch.nn.Module, args: tuple, kwargs: Kwargs) -> tuple[tuple, Kwargs] | None:
            if self.state.phase == "decode":
                return self._decode(args, kwargs, self._in_force(self._stage_of(j, decode=True)), j)
            if j < self.k:  # K_1-1 runs unpruned at prefill (final-cache methods hook it for decode only)
                return None
            if stage is not None:
                return self._prune(stage, args, kwargs)
            current = self._in_force(self._stage_of(j))
            return None if current is None else self._substitute(args, kwargs, current)

        return hook

    def _in_force(self, stage: int) -> Compaction | None:
        stages = self.state.intra_stages
        return stages[stage] if stage < len(stages) else (stages[-1] if stages else None)

    def _prune(self, stage: int, args: tuple, kwargs: Kwargs) -> tuple[tuple, Kwargs] | None:
        """Stage `stage` at its layer: rank the surviving visual tokens, drop, compose the compaction."""
        previous = self._in_force(stage - 1) if stage else None
        full = {k: kwargs.get(k) for k in ("position_embeddings", "position_ids", "attention_mask")}
        if previous is not None:  # the signals see the sequence as stage s-1 left it
            args, kwargs = self._substitute(args, kwargs, previous)
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.state.image_mask is None or not bool(self.state.image_mask.any()):
            self.state.intra_stages.append(previous)
            return None if previous is None else (args, kwargs)
        if self._ragged(stage):  # rows of a batch with different visual-token counts: one row at a time
            with self.timer.span("method"):
                kept = self._select_rows(stage, hidden, kwargs)
            hidden, compaction = self._shorten_rows(hidden, kept, previous, full)
            self.state.intra_stages.append(compaction)
            self.state.intra = compaction
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return self._substitute(args, kwargs, compaction)
        with self.timer.span("method"):
            image_rows = rows_of(self.state.image_mask)  # [B, N_s]
            keep_visual = self._select(stage, image_rows, hidden, kwargs)
        if keep_visual is None:  # the stage keeps every surviving token
            self.state.intra_stages.append(previous)
            self._count(stage, image_rows.shape[1])
            return None if previous is None else (args, kwargs)
        hidden, compaction, n_kept = self._shorten(hidden, image_rows, keep_visual, previous, full)
        self.state.intra_stages.append(compaction)
        self.state.intra = compaction
        self._count(stage, n_kept)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return self._substitute(args, kwargs, compaction)

    def _ragged(self, stage: int) -> bool:
        """Whether the rows of this batch hold different visual-token counts (per-sample budgets then apply
        row by row); a multi-layer method's stage plan is per prompt: it needs equal counts."""
        counts = self.state.image_mask.sum(dim=1)
        if bool((counts == counts[0]).all()):
            return False
        if self.multi:
            raise UserError(f"{self.method.name} at batch size {counts.numel()}: the rows of a batch reach layer "
                            f"{self.layers[stage]} with different visual-token counts "
                            f"({', '.join(map(str, counts.tolist()))}); multi-layer intra-LLM methods plan their "
                            f"stages per prompt and batch only equal counts: use batch_size=1")
        return True

    def _select_rows(self, stage: int, hidden: torch.Tensor, kwargs: Kwargs) -> list[torch.Tensor]:
        """Each batch row on its own (its visual rows, signals, budget round(keep * N_b), seed): per row, the
        sorted sequence rows of the visual tokens it keeps. The signals see exactly the row's tensors."""
        b = hidden.shape[0]
        state, caps = self.state, dict(self.state.captures)
        mask2d, protected, seeds = state.attention_mask_2d, state.protected, state.row_seeds
        out = []
        if stage == 0:
            self._n_entry = [0] * b
        try:
            for row in range(b):
                state.captures = {k: _batch_row(v, row, b) for k, v in caps.items()}
                state.attention_mask_2d = _batch_row(mask2d, row, b)
                state.protected = _batch_row(protected, row, b)
                image_rows = state.image_mask[row : row + 1].nonzero()[:, 1][None]  # [1, N_b]
                if len(seeds) == b:
                    self.generator.manual_seed(seeds[row])
                decision = self._select(stage, image_rows, hidden[row : row + 1],
                                        {k: _batch_row(v, row, b) for k, v in kwargs.items()}, row=row)
                if isinstance(decision, Insertion):
                    raise UserError(f"{self.method.name} inserts tokens and batches only equal counts: use batch_size=1")
                out.append(image_rows[0, decision[0].to(image_rows.device)])
                self._count(stage, out[-1].numel(), row=row)
        finally:
            state.attention_mask_2d, state.protected = mask2d, protected
            state.captures = {}
        return out

    def _shorten_rows(self, hidden: torch.Tensor, kept: list[torch.Tensor], previous: Compaction | None,
                      full: Kwargs) -> tuple[torch.Tensor, Compaction]:
        """`_shorten` for rows that keep different counts: the shortened sequence is left-padded again (filler
        slots masked out of attention), composed with the previous stage's compaction."""
        keep = ~self.state.image_mask
        for row, rows in enumerate(kept):
            keep[row, rows.to(keep.device)] = True
        local, pad = padded_rows(keep)
        index = local if previous is None else previous.index.gather(1, local)
        if previous is not None and previous.pad is not None:
            before = previous.pad.gather(1, local)
            pad = before if pad is None else pad | before
        hidden = hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))
        self.state.image_mask = self.state.image_mask.gather(1, local)
        if self.state.protected is not None:
            self.state.protected = self.state.protected.gather(1, local)
        if self.state.attention_mask_2d is not None:
            self.state.attention_mask_2d = _padded_mask(self.state.attention_mask_2d.gather(1, local), pad)
        if pad is not None:
            self.state.image_mask &= ~pad
            if self.state.protected is not None:
                self.state.protected &= ~pad
        return hidden, self._compaction(hidden, full, index, pad=pad)

    def _shorten(self, hidden: torch.Tensor, image_rows: torch.Tensor, decision: torch.Tensor | Insertion,
                 previous: Compaction | None, full: Kwargs) -> tuple[torch.Tensor, Compaction, int]:
        """Drop the visual rows the stage did not keep (and insert the ones it adds) in the current sequence;
        compose the result with the previous stage's compaction. Returns (hidden, compaction, kept count)."""
        keep_visual, extra = (decision.index, decision.extra) if isinstance(decision, Insertion) else (decision, None)
        kept_rows = image_rows.gather(1, keep_visual.to(image_rows.device))
        local = rows_of((~self.state.image_mask).scatter(1, kept_rows, True))  # rows of the current sequence
        index = local if previous is None else previous.index.gather(1, local)  # rows of the LLM's input
        inserted = None if previous is None or previous.inserted is None else previous.inserted.gather(1, local)
        hidden = hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))
        self.state.image_mask = self.state.image_mask.gather(1, local)
        if self.state.protected is not None:
            self.state.protected = self.state.protected.gather(1, local)
        if self.state.attention_mask_2d is not None:
            self.state.attention_mask_2d = self.state.attention_mask_2d.gather(1, local)
        n_extra = 0 if extra is None else extra.shape[1]
        if n_extra:
            hidden, index, inserted = self._insert(hidden, index, inserted, extra)
        return hidden, self._compaction(hidden, full, index, inserted), keep_visual.shape[1] + n_extra

    def _insert(self, hidden: torch.Tensor, index: torch.Tensor, inserted: torch.Tensor | None, extra: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Insert extra [B, m, D] visual tokens right after the last kept visual token of each row."""
        at = rows_of(self.state.image_mask)[:, -1] + 1  # [B]
        m = extra.shape[1]
        if inserted is None:
            inserted = torch.zeros_like(index, dtype=torch.bool)
        self.state.image_mask = _insert_rows(self.state.image_mask, at, self.state.image_mask.new_ones(at.shape[0], m))
        if self.state.protected is not None:  # inserted tokens are not protected
            self.state.protected = _insert_rows(self.state.protected, at, self.state.protected.new_zeros(at.shape[0], m))
        if self.state.attention_mask_2d is not None:
            mask2d = self.state.attention_mask_2d
            self.state.attention_mask_2d = _insert_rows(mask2d, at, mask2d.gather(1, (at - 1)[:, None]).expand(-1, m))
        return (_insert_rows(hidden, at, extra.to(hidden)),
                _insert_rows(index, at, index.gather(1, (at - 1)[:, None]).expand(-1, m)),
                _insert_rows(inserted, at, inserted.new_ones(at.shape[0], m)))

    def _select(self, stage: int, image_rows: torch.Tensor, hidden: torch.Tensor, kwargs: Kwargs,
                row: int | None = None) -> torch.Tensor | Insertion | None:
        """[B, n_s] kept indices among the surviving visual tokens (with tokens to insert, for methods that
        add some); None when a multi-layer stage keeps all."""
        n_now = image_rows.shape[1]
        if stage == 0:
            n_keep, clamped = n_keep_for(self.keep, n_now)
            # no per-token budget: an operating point (VTW) or thresholds (MustDrop) decide the counts
            clamped = clamped and self.method.spec.layer_for_keep is None and not self.method.spec.adaptive
            args = (len(self.seams.decoder_layers), n_now, n_keep, self.method.params)
            self.state.intra_selects = self.method.spec.intra_selects(*args, keep=self.keep)
            self.state.intra_plan = self.method.spec.intra_plan(*args, keep=self.keep,
                                                                selects=self.state.intra_selects)
            flag = self.method.spec.unreachable_budget(*args)
            if flag is not None and flag not in self.flags:
                self.flags.append(flag)
            # n_visual_in: what the prompt held (an earlier pipeline stage may have pruned before the LLM)
            if row is None:
                self._n_entry = [n_now] * len(self.state.row_counts or [0])
            else:
                self._n_entry[row] = n_now
            self._set_rows(lambda prior: TokenCounts(prior.n_visual_in or n_now, n_now, float(n_now),
                                                     clamped or self.state.clamped or prior.clamped, prior.n_fixed),
                           row=row)
        adaptive = self.method.spec.adaptive
        if self.multi:
            n_keep = min(self.state.intra_selects[stage], n_now)
            if n_keep >= n_now and not adaptive:
                return None
        else:  # single-layer methods get the round(keep * N) budget and report what they kept (budget)
            n_keep = n_keep_for(self.keep, n_now)[0]
        ctx = SelectContext(
            tokens=hidden.gather(1, image_rows[..., None].expand(-1, -1, hidden.shape[-1])),
            n_keep=n_keep, grid=self._grid(n_now) if stage == 0 else None, generator=self.generator,
            signals=self._signals(self.layers[stage], image_rows, hidden, kwargs), keep=self.keep,
        )
        decision = self._decide(ctx)
        if adaptive and not isinstance(decision, Insertion) and decision.shape[1] == n_now:
            return None  # the thresholds kept every surviving token
        return decision

    def _decide(self, ctx: SelectContext) -> torch.Tensor | Insertion:
        """The method's decision; in a batch of several samples, one row at a time, each from its own seed, so a
        sample's picks do not depend on the batch it runs in."""
        b = ctx.tokens.shape[0]
        seeds = self.state.row_seeds
        if b == 1 or len(seeds) != b:
            return self.method.spec.fn(ctx, **self.method.params)
        out = []
        for row in range(b):
            self.generator.manual_seed(seeds[row])
            signals = {k: v[row : row + 1] if isinstance(v, torch.Tensor) and v.shape[:1] == (b,) else v
                       for k, v in ctx.signals.items()}
            out.append(self.method.spec.fn(SelectContext(
                tokens=ctx.tokens[row : row + 1], n_keep=ctx.n_keep, grid=ctx.grid, generator=ctx.generator,
                signals=signals, keep=ctx.keep), **self.method.params))
        if any(isinstance(d, Insertion) for d in out) or len({d.shape[1] for d in out}) > 1:
            raise UserError(f"{self.method.name} at batch size {b}: its rows kept different counts; use batch_size=1")
        return torch.cat(out)

    def _set_rows(self, update: Any, row: int | None = None) -> None:
        """Apply update(TokenCounts) -> TokenCounts to every batch row's counts, or to one row's (row 0 is
        `counts`)."""
        rows = self.state.row_counts or [self.state.counts]
        self.state.row_counts = [update(c) if row is None or r == row else c for r, c in enumerate(rows)]
        self.state.counts = self.state.row_counts[0]

    def _count(self, stage: int, n_kept: int, row: int | None = None) -> None:
        """Record stage `stage`'s kept count (of every row, or of one); the layer average runs over the stages
        so far."""
        r = 0 if row is None else row
        counts = (self.state.row_counts or [self.state.counts])[r]
        schedule = [*counts.schedule[:stage], (self.layers[stage], n_kept)]
        layer_avg = layer_average(len(self.seams.decoder_layers), self._n_entry[r], schedule)
        self._set_rows(lambda c: TokenCounts(c.n_visual_in, n_kept, layer_avg, c.clamped, c.n_fixed, schedule=schedule),
                       row=row)
        if r == 0:
            self.state.stage_counts["intra"] = TokenCounts(self._n_entry[0], n_kept, layer_avg, counts.clamped,
                                                           schedule=schedule)

    def _grid(self, n: int) -> tuple[int, int] | None:
        """The visual tokens' grid when the prompt holds one image of the encoder's grid."""
        grid = self.seams.vision_grid
        sizes = self.state.visual_sizes
        batch = self.state.image_mask.shape[0] if self.state.image_mask is not None else 1
        return grid if grid is not None and grid[0] * grid[1] == n and (sizes is None or len(sizes) <= batch) else None

    def _compaction(self, hidden: torch.Tensor, kwargs: Kwargs, index: torch.Tensor,
                    inserted: torch.Tensor | None = None, pad: torch.Tensor | None = None) -> Compaction:
        """index: [B, L'] the surviving rows of the sequence that entered the LLM (length L); kwargs are
        the layer's own, i.e. that full sequence's positions, RoPE and mask; inserted: [B, L'] new rows."""
        b = index.shape[0]
        cos, sin = kwargs["position_embeddings"]
        length = cos.shape[-2]
        keep = torch.zeros(b, length, dtype=torch.bool, device=index.device).scatter(1, index, True)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(length, device=hidden.device).expand(b, length)
        pos = pos.expand(*pos.shape[:-2], b, length)
        new_pos = renumber(keep, pos, index, self.positions)
        if inserted is not None and self.positions is Positions.CONTIGUOUS:  # truncated: 0..L'-1 from the start
            new_pos = new_pos[..., :1] + torch.arange(index.shape[1], device=new_pos.device)
        if self.positions is Positions.ORIGINAL:
            d = cos.shape[-1]
            pe = (cos.expand(b, -1, -1).gather(1, index[..., None].expand(-1, -1, d)),
                  sin.expand(b, -1, -1).gather(1, index[..., None].expand(-1, -1, d)))
            shift = 0
        else:
            pe = self.seams.decoder.rotary(self.seams.language_model, hidden, new_pos)
            shift = length - index.shape[1] if pad is None else \
                (length - index.shape[1] + pad.sum(dim=1, keepdim=True)).to(new_pos.device)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = _gather_mask(_gather_mask(mask, index, dim=2), index, dim=3)
            if inserted is not None:  # rows sharing a stand-in row must still be causal among themselves
                causal = torch.ones(index.shape[1], index.shape[1], dtype=torch.bool, device=mask.device).tril()
                mask = mask & causal if mask.dtype == torch.bool else mask.masked_fill(
                    ~causal, torch.finfo(mask.dtype).min)
        if pad is not None:
            mask = _masked_fillers(mask, pad)
        return Compaction(index=index, full_len=length, position_ids=new_pos, shift=shift,
                          position_embeddings=pe, attention_mask=mask, inserted=inserted, pad=pad)

    @staticmethod
    def _substitute(args: tuple, kwargs: Kwargs, c: Compaction) -> tuple[tuple, Kwargs]:
        kwargs["position_embeddings"] = c.position_embeddings
        kwargs["position_ids"] = c.position_ids
        if c.pad is not None or ("attention_mask" in kwargs and isinstance(kwargs["attention_mask"], torch.Tensor)):
            kwargs["attention_mask"] = c.attention_mask
        return args, kwargs

    def _decode(self, args: tuple, kwargs: Kwargs, c: Compaction | None, j: int) -> tuple[tuple, Kwargs] | None:
        if c is None:
            return None
        mask = kwargs.get("attention_mask")
        if c.pad is not None and not isinstance(mask, torch.Tensor):  # fillers must be masked: build the mask
            hidden = args[0] if args else kwargs["hidden_states"]
            b, steps = hidden.shape[:2]
            generated = kwargs["past_key_values"].get_seq_length(j) - c.index.shape[1]  # decoded before this step
            mask = torch.ones(b, 1, steps, c.full_len + generated + steps, dtype=torch.bool, device=hidden.device)
            mask[..., -steps:] = torch.ones(steps, steps, dtype=torch.bool, device=hidden.device).tril()
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            head = _gather_mask(mask[..., : c.full_len], c.index, dim=3)
            if c.pad is not None:
                head = _masked_columns(head, c.pad)
            kwargs["attention_mask"] = torch.cat([head, mask[..., c.full_len :]], dim=-1)
        if not (isinstance(c.shift, int) and c.shift == 0):
            hidden = args[0] if args else kwargs["hidden_states"]
            pos = kwargs["position_ids"] - c.shift
            kwargs["position_ids"] = pos
            kwargs["position_embeddings"] = self.seams.decoder.rotary(self.seams.language_model, hidden, pos)
        return args, kwargs


def _batch_row(value: Any, row: int, b: int) -> Any:
    """Row `row` of a batch-first tensor (or of each tensor in a tuple), kept 1 wide; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value[row : row + 1] if value.dim() and value.shape[0] == b else value
    if isinstance(value, tuple):
        return tuple(_batch_row(v, row, b) for v in value)
    return value


def _masked_columns(mask: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """A 4-D mask [B, h, q, kv'] with the filler columns (pad [B, kv']) masked out."""
    cols = pad[:, None, None, :].to(mask.device)
    return mask & ~cols if mask.dtype == torch.bool else mask.masked_fill(cols, torch.finfo(mask.dtype).min)


def _masked_fillers(mask: torch.Tensor | None, pad: torch.Tensor) -> torch.Tensor:
    """The prefill 4-D mask of a left-padded compaction: no row attends to a filler slot; a filler attends to
    itself only (a fully masked row would give NaNs). A missing mask (SDPA's causal default) is built."""
    b, length = pad.shape
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=pad.device).tril()[None, None].expand(b, 1, -1, -1)
    mask = _masked_columns(mask, pad)
    diagonal = torch.eye(length, dtype=torch.bool, device=mask.device)[None, None] & pad[:, None, :, None].to(mask.device)
    return mask | diagonal if mask.dtype == torch.bool else mask.masked_fill(diagonal, 0.0)


def _insert_rows(x: torch.Tensor, at: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """x [B, L, ...] with new [B, m, ...] inserted before row at[b] of each batch row: [B, L+m, ...]."""
    return torch.stack([torch.cat([x[b, :a], new[b], x[b, a:]]) for b, a in enumerate(at.tolist())])


def _gather_mask(mask: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Select rows (dim=2) or columns (dim=3) of a 4-D attention mask [B|1, h, q, kv] by index [B, L']."""
    b = index.shape[0]
    mask = mask.expand(b, *mask.shape[1:])
    shape = list(mask.shape)
    shape[dim] = index.shape[1]
    view = [b, 1, 1, 1]
    view[dim] = index.shape[1]
    return mask.gather(dim, index.view(*view).expand(*shape))
