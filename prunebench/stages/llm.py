"""LLM-side seams: the LLM entry (where pre-LLM and vision-stage decisions shorten the
sequence) and layer K (intra-LLM methods).

Both are forward pre-hooks with kwargs on the model instance; no modeling file is forked and
attention stays SDPA/Flash. Decode steps are fixed up in the same hooks: the 2-D padding mask
loses the dropped columns, and positions follow the method's policy (original positions with
gaps, or closed up).
"""

from __future__ import annotations

from typing import Any

import torch

from prunebench.errors import UserError
from prunebench.methods.base import Positions, ResolvedMethod, SelectContext, n_keep_for
from prunebench.models.base import Seams
from prunebench.stages.attention import last_query_attention, position_query_attention
from prunebench.stages.state import CallState, Compaction, TokenCounts, renumber, rows_of
from prunebench.timing import Timer

Kwargs = dict[str, Any]

# Signals recomputed from layer K-1's captured q/k (and rotary embeddings).
ATTENTION_SIGNALS = frozenset({"last_query_attention", "last_visual_query_attention"})
CAPTURE_SIGNALS = ATTENTION_SIGNALS | {"layer_keys"}


def capture_image_positions(seams: Seams, state: CallState):
    """Pre-hook on the multimodal module: remember where the visual tokens of a prompt are, and
    count them (a later stage overwrites the counts with what it kept)."""
    ids = torch.tensor(seams.image_token_ids)

    def hook(module: torch.nn.Module, args: tuple, kwargs: Kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and input_ids.shape[1] > 1:
            state.mixed = sum(bool((input_ids == i).any()) for i in seams.image_token_ids) > 1
            state.image_mask = torch.isin(input_ids, ids.to(input_ids.device))
            n = int(state.image_mask[0].sum())
            state.counts = TokenCounts(n, n, float(n))

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
    index = rows_of(keep)
    n_out = int(keep[0].sum() - (~state.image_mask[0]).sum())
    state.counts = TokenCounts(int(state.image_mask[0].sum()), n_out, float(n_out), state.clamped, state.fixed)
    state.stage_counts["entry"] = state.counts
    state.clamped, state.fixed = False, 0
    state.visual_sizes = state.visual_values = None
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.arange(length, device=embeds.device).expand(b, length)
    new_pos = renumber(keep, pos.expand(*pos.shape[:-2], b, length), index, positions)
    shift = length - index.shape[1] if positions is Positions.CONTIGUOUS else 0
    state.entry = Compaction(index=index, full_len=length, position_ids=new_pos, shift=shift)
    state.image_mask = state.image_mask.gather(1, index)
    state.visual_keep = None
    kwargs["inputs_embeds"] = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
    kwargs["position_ids"] = new_pos
    if mask2d is not None:
        kwargs["attention_mask"] = mask2d.gather(1, index)
    state.attention_mask_2d = kwargs.get("attention_mask")
    return kwargs


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
        head = mask2d[:, : entry.full_len].gather(1, entry.index)
        kwargs["attention_mask"] = torch.cat([head, mask2d[:, entry.full_len :]], dim=1)
    pos = kwargs.get("position_ids")
    if pos is not None:
        kwargs["position_ids"] = pos - entry.shift
    elif entry.shift == 0:  # original positions: continue after the full prompt
        past = _past_length(kwargs)
        dropped = entry.full_len - entry.index.shape[1]
        start = past + dropped
        kwargs["position_ids"] = torch.arange(start, start + embeds.shape[1], device=embeds.device)[None]
    return kwargs


class IntraLLM:
    """Prune visual tokens inside the LLM at layer K = method.params['layer']."""

    def __init__(self, seams: Seams, method: ResolvedMethod, keep: float, positions: Positions, state: CallState,
                 timer: Timer, generator: torch.Generator) -> None:
        self.seams, self.method, self.keep, self.positions, self.state = seams, method, keep, positions, state
        self.timer, self.generator = timer, generator
        self.k = self._layer(seams, method, keep)
        if "grid" in method.spec.needs and (seams.vision_grid is None or seams.always_keep is not None):
            # packed any-resolution tokens (LLaVA-NeXT / OneVision: base + tiles + newlines) or dynamic
            # resolution (Qwen, InternVL tiles) have no single h x w layout inside the LLM
            raise UserError(f"{method.name} needs the visual tokens to form a grid: not supported on the "
                            f"{seams.family} family (its visual tokens reach the LLM packed or at dynamic resolution)")

    @staticmethod
    def _layer(seams: Seams, method: ResolvedMethod, keep: float) -> int:
        """K: the method's `layer`, or the layer its keep fraction maps to (VTW); K = n_layers (only
        for the latter) prunes nothing."""
        n_layers, spec = len(seams.decoder_layers), method.spec
        if spec.layer_for_keep is None:
            k, low, high = int(method.params["layer"]), 1, n_layers - 1
        else:
            k, low, high = int(spec.layer_for_keep(keep, n_layers, **method.params)), 0, n_layers
        if not CAPTURE_SIGNALS.isdisjoint(spec.needs):
            low = max(low, 1)  # the signals come from layer K-1
        if not low <= k <= high:
            raise UserError(f"{method.name}: layer must be in {low}..{high} for this model "
                            f"({n_layers} decoder layers), got {k}")
        return k

    def register(self) -> list[torch.utils.hooks.RemovableHandle]:
        layers = self.seams.decoder_layers
        if self.k == len(layers):  # the operating point withdraws nothing: the unpruned model
            return []
        handles = [layers[self.k].register_forward_pre_hook(self._at_k, with_kwargs=True)]
        for layer in layers[self.k + 1 :]:
            handles.append(layer.register_forward_pre_hook(self._after_k, with_kwargs=True))
        if not CAPTURE_SIGNALS.isdisjoint(self.method.spec.needs):
            handles += self._register_capture(layers[self.k - 1])
        return handles

    # -- signals -------------------------------------------------------------------------
    def _register_capture(self, layer: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        caps = self.state.captures

        def keep_output(name: str):
            def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
                if self.state.phase == "prefill":
                    caps[name] = output

            return hook

        def keep_rope(module: torch.nn.Module, args: tuple, kwargs: Kwargs) -> None:
            if self.state.phase == "prefill":
                caps["rope"] = kwargs["position_embeddings"]

        attn = layer.self_attn
        return [
            layer.register_forward_pre_hook(keep_rope, with_kwargs=True),
            attn.q_proj.register_forward_hook(keep_output("q")),
            attn.k_proj.register_forward_hook(keep_output("k")),
        ]

    def _signals(self, image_rows: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """The signals the method needs; image_rows [B, N], hidden [B, L, D] entering layer K."""
        needs = self.method.spec.needs
        out = self._row_signals(image_rows, hidden)
        if CAPTURE_SIGNALS.isdisjoint(needs):
            return out
        caps, attn = self.state.captures, self.seams.decoder_layers[self.k - 1].self_attn
        cos, sin = caps["rope"]
        if "layer_keys" in needs:  # DART: heads concatenated, as its `any_states.permute(0, 2, 1, 3)`
            b, length, _ = caps["k"].shape
            keys = self.seams.apply_rope(caps["k"].view(b, length, -1, attn.head_dim).transpose(1, 2), cos, sin)
            out["layer_keys"] = keys.transpose(1, 2).reshape(b, length, -1)
        mask = self.state.attention_mask_2d
        common = dict(head_dim=attn.head_dim, scale=attn.scaling, apply_rope=self.seams.apply_rope,
                      key_mask=None if mask is None else mask.bool())
        if "last_query_attention" in needs:
            row = last_query_attention(caps["q"], caps["k"], cos, sin, **common)
            out["last_query_attention"] = row.gather(1, image_rows)
        if "last_visual_query_attention" in needs:  # FastV_VIS: the row of the last visual token
            row = position_query_attention(caps["q"], caps["k"], cos, sin, image_rows[:, -1], **common)
            out["last_visual_query_attention"] = row.gather(1, image_rows)
        caps.clear()
        return out

    def _row_signals(self, image_rows: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Signals read off the hidden states entering layer K; image_rows [B, N], hidden [B, L, D]."""
        needs, out = self.method.spec.needs, {}
        if "last_token_hidden" in needs:
            out["last_token_hidden"] = hidden[:, -1]
        if "normed_hidden" in needs:  # DART: `self.norm(last_layer_state)`
            out["normed_hidden"] = self.seams.language_model.norm(hidden)
        if "visual_rows" in needs:
            out["visual_rows"] = image_rows
        if "text_after_visual" in needs:
            rows = torch.arange(hidden.shape[1], device=hidden.device)[None]
            after = rows > image_rows[:, -1:]
            mask = self.state.attention_mask_2d
            out["text_after_visual"] = after if mask is None else after & mask.bool().to(after.device)
        return out

    # -- hooks ---------------------------------------------------------------------------
    def _at_k(self, module: torch.nn.Module, args: tuple, kwargs: Kwargs) -> tuple[tuple, Kwargs] | None:
        if self.state.phase == "decode":
            return self._decode(args, kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.state.image_mask is None or not bool(self.state.image_mask.any()):
            return None
        with self.timer.span("method"):
            image_rows = rows_of(self.state.image_mask)  # [B, N]
            n_in = image_rows.shape[1]
            n_keep, clamped = n_keep_for(self.keep, n_in)
            clamped = clamped and self.method.spec.layer_for_keep is None  # no per-token budget (VTW)
            ctx = SelectContext(
                tokens=hidden.gather(1, image_rows[..., None].expand(-1, -1, hidden.shape[-1])),
                n_keep=n_keep, grid=self._grid(n_in), generator=self.generator,
                signals=self._signals(image_rows, hidden),
            )
            keep_visual = self.method.spec.fn(ctx, **self.method.params)
            n_keep = keep_visual.shape[1]  # the method's documented count (MethodSpec.budget)
            compaction = self._compaction(hidden, kwargs, image_rows.gather(1, keep_visual.to(image_rows.device)))
        self.state.intra = compaction
        n_layers = len(self.seams.decoder_layers)
        # `prior`: what entered the LLM (an earlier pipeline stage may have pruned already; else n_in)
        prior = self.state.counts
        self.state.stage_counts["intra"] = TokenCounts(n_in, n_keep, float(n_keep), clamped)
        self.state.counts = TokenCounts(prior.n_visual_in, n_keep,
                                        (self.k * n_in + (n_layers - self.k) * n_keep) / n_layers,
                                        clamped or self.state.clamped or prior.clamped, prior.n_fixed)
        hidden = hidden.gather(1, compaction.index[..., None].expand(-1, -1, hidden.shape[-1]))
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return self._substitute(args, kwargs)

    def _grid(self, n: int) -> tuple[int, int] | None:
        """The visual tokens' grid when the prompt holds one image of the encoder's grid."""
        grid = self.seams.vision_grid
        sizes = self.state.visual_sizes
        return grid if grid is not None and grid[0] * grid[1] == n and (sizes is None or len(sizes) <= 1) else None

    def _compaction(self, hidden: torch.Tensor, kwargs: Kwargs, kept_rows: torch.Tensor) -> Compaction:
        """kept_rows: [B, k] sequence rows of the visual tokens that stay."""
        b, length, _ = hidden.shape
        keep = (~self.state.image_mask).scatter(1, kept_rows, True)
        index = rows_of(keep)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(length, device=hidden.device).expand(b, length)
        pos = pos.expand(*pos.shape[:-2], b, length)
        new_pos = renumber(keep, pos, index, self.positions)
        if self.positions is Positions.ORIGINAL:
            cos, sin = kwargs["position_embeddings"]
            d = cos.shape[-1]
            pe = (cos.expand(b, -1, -1).gather(1, index[..., None].expand(-1, -1, d)),
                  sin.expand(b, -1, -1).gather(1, index[..., None].expand(-1, -1, d)))
            shift = 0
        else:
            pe = self.seams.language_model.rotary_emb(hidden, position_ids=new_pos)
            shift = length - index.shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = _gather_mask(_gather_mask(mask, index, dim=2), index, dim=3)
        return Compaction(index=index, full_len=length, position_ids=new_pos, shift=shift,
                          position_embeddings=pe, attention_mask=mask)

    def _after_k(self, module: torch.nn.Module, args: tuple, kwargs: Kwargs) -> tuple[tuple, Kwargs] | None:
        if self.state.intra is None:
            return None
        if self.state.phase == "decode":
            return self._decode(args, kwargs)
        return self._substitute(args, kwargs)

    def _substitute(self, args: tuple, kwargs: Kwargs) -> tuple[tuple, Kwargs]:
        c = self.state.intra
        assert c is not None
        kwargs["position_embeddings"] = c.position_embeddings
        kwargs["position_ids"] = c.position_ids
        if "attention_mask" in kwargs and isinstance(kwargs["attention_mask"], torch.Tensor):
            kwargs["attention_mask"] = c.attention_mask
        return args, kwargs

    def _decode(self, args: tuple, kwargs: Kwargs) -> tuple[tuple, Kwargs] | None:
        c = self.state.intra
        if c is None:
            return None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            head = _gather_mask(mask[..., : c.full_len], c.index, dim=3)
            kwargs["attention_mask"] = torch.cat([head, mask[..., c.full_len :]], dim=-1)
        if c.shift:
            hidden = args[0] if args else kwargs["hidden_states"]
            pos = kwargs["position_ids"] - c.shift
            kwargs["position_ids"] = pos
            kwargs["position_embeddings"] = self.seams.language_model.rotary_emb(hidden, position_ids=pos)
        return args, kwargs


def _gather_mask(mask: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Select rows (dim=2) or columns (dim=3) of a 4-D attention mask [B|1, h, q, kv] by index [B, L']."""
    b = index.shape[0]
    mask = mask.expand(b, *mask.shape[1:])
    shape = list(mask.shape)
    shape[dim] = index.shape[1]
    view = [b, 1, 1, 1]
    view[dim] = index.shape[1]
    return mask.gather(dim, index.view(*view).expand(*shape))
