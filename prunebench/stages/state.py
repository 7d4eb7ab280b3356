"""State shared by one installation's hooks across the calls of one `generate` / forward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from prunebench.methods.base import Positions


@dataclass
class Compaction:
    """A shortened sequence: which rows of the full sequence survive, and how they are placed.

    index: [B, L'] sorted indices into the full sequence of length `full_len`.
    position_ids: [..., B, L'] positions of the kept rows at prefill.
    shift: how many positions decode steps move back (dropped tokens, contiguous policy), else 0; a [B, 1]
        tensor when the rows of a batch dropped different counts.
    pad: [B, L'] True at filler slots (batches whose rows kept different counts are left-padded again; a
        filler repeats row 0 of its batch row and is masked out), None when every row kept the same count.
    """

    index: torch.Tensor
    full_len: int
    position_ids: torch.Tensor
    shift: int | torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    attention_mask: torch.Tensor | None = None
    # [B, L'] True at rows a stage inserted (SparseVLM's recycled tokens); their `index` entry is the row
    # they follow (the last kept visual token), which stands in for them in masks and original positions
    inserted: torch.Tensor | None = None
    pad: torch.Tensor | None = None


@dataclass
class TokenCounts:
    """Visual tokens of the last prompt: in, reaching the LLM (or layer K), averaged over LLM layers."""

    n_visual_in: int = 0
    n_visual_out: int = 0
    layer_avg: float = 0.0
    clamped: bool = False  # keep*N rounded to 0 for some image: one token kept instead
    n_fixed: int = 0  # kept outside the budget (LLaVA-NeXT newlines), included in n_visual_out
    # intra-LLM: [(K_s, visual tokens from layer K_s on), ...], one entry per pruning stage
    schedule: list[tuple[int, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_visual_in": self.n_visual_in, "n_visual_out": self.n_visual_out,
                               "layer_avg": self.layer_avg, "clamped_to_one": self.clamped,
                               "n_visual_fixed": self.n_fixed}
        if self.schedule:
            out["llm_schedule"] = [list(stage) for stage in self.schedule]
        return out


@dataclass
class CallState:
    phase: str = "idle"  # "prefill" | "decode", set at the LLM entry
    image_mask: torch.Tensor | None = None  # [B, L] image-token positions of the current sequence
    prompt_image_mask: torch.Tensor | None = None  # [B, L] image-token positions of the prompt as given (`kept.py`)
    mixed: bool = False  # the prompt holds more than one kind of visual placeholder (image and video)
    attention_mask_2d: torch.Tensor | None = None  # [B, L] padding mask after entry compaction
    visual_sizes: list[int] | None = None  # tokens per image, in scatter order (from the visual seam)
    visual_keep: list[torch.Tensor] | None = None  # per image: kept indices, pending from vision / pre-LLM
    visual_values: list[torch.Tensor | None] | None = None  # per image: new values of the kept tokens, or None
    # per image: for each of its tokens, the index of the token it merged into (vision-stage merges), pending
    visual_groups: list[torch.Tensor] | None = None
    merge_groups: tuple[list[torch.Tensor], list[int]] | None = None  # this prompt's groups and unit sizes
    # per image: bool per kept token, protected from the LLM stages (MustDrop's key set), pending like visual_keep
    visual_protect: list[torch.Tensor] | None = None
    protected: torch.Tensor | None = None  # [B, L] bool rows of the current sequence that no LLM stage drops
    clamped: bool = False
    fixed: int = 0  # tokens the visual seam keeps outside the budget, this prompt
    entry: Compaction | None = None
    intra: Compaction | None = None  # the last intra-LLM compaction of this prompt
    # per intra-LLM stage: the compaction in force from its layer on (composed over earlier stages)
    intra_stages: list[Compaction | None] = field(default_factory=list)
    intra_plan: list[tuple[int, int]] = field(default_factory=list)  # documented (K_s, n_s) of this prompt
    intra_selects: list[int] = field(default_factory=list)  # tokens each stage selects (before extra ones)
    text_tail: int = 0  # text rows after the last visual token (never pruned): the last rows of the sequence
    raters: torch.Tensor | None = None  # [B, text_tail] bool, SparseVLM raters from the LLM input embeddings
    counts: TokenCounts = field(default_factory=TokenCounts)  # batch row 0 (the only row at batch size 1)
    row_counts: list[TokenCounts] = field(default_factory=list)  # per batch row, this prompt
    # per visual unit (image, view, frame) in scatter order, as a select stage decided it: clamped, fixed tokens
    unit_clamped: list[bool] = field(default_factory=list)
    unit_fixed: list[int] = field(default_factory=list)
    row_seeds: list[int] = field(default_factory=list)  # per batch row: the seed its sample runs under
    captures: dict[str, Any] = field(default_factory=dict)  # q/k/rope captured for signals
    vision: Any = None  # per-call merge state of the vision stage
    # A pre-LLM selection deferred to the LLM entry (text-conditioned methods): called there with
    # (inputs_embeds [B, L, D], 2-D padding mask or None) before the sequence is compacted.
    select_at_entry: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None
    stage_counts: dict[str, TokenCounts] = field(default_factory=dict)  # "entry" / "intra": this prompt

    def new_prompt(self) -> None:
        self.entry = None
        self.intra = None
        self.intra_stages = []
        self.intra_plan = []
        self.intra_selects = []
        self.raters = None
        self.protected = None
        self.merge_groups = None
        self.captures.clear()
        self.stage_counts.clear()


def renumber(keep_mask: torch.Tensor, positions: torch.Tensor, index: torch.Tensor, policy: Positions) -> torch.Tensor:
    """Positions of the kept rows: original ones, or closed up over the dropped rows.

    keep_mask: [B, L] bool; positions: [..., B, L] original positions (leading axes for M-RoPE);
    index: [B, L'] kept rows.
    """
    lead = positions.shape[:-2]
    kept = positions.gather(-1, index.expand(*lead, *index.shape))
    if policy is Positions.ORIGINAL:
        return kept
    dropped_before = (~keep_mask).long().cumsum(dim=1).gather(1, index)
    return kept - dropped_before


def padded_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, L] bool -> ([B, L'] sorted indices of the True entries, left-padded with row 0 where a row has
    fewer, L' the largest count; [B, L'] True at those filler slots, or None when every row has L')."""
    counts = mask.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    if bool((counts == width).all()):
        return mask.nonzero()[:, 1].view(mask.shape[0], width), None
    pad = torch.arange(width, device=mask.device)[None] < (width - counts)[:, None]
    index = torch.zeros(mask.shape[0], width, dtype=torch.long, device=mask.device)
    index[~pad] = mask.nonzero()[:, 1]
    return index, pad


def rows_of(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool with the same count per row -> [B, L'] sorted indices of the True entries."""
    counts = mask.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise RuntimeError(
            "pruning left rows of the batch with different lengths; run with batch_size=1 for this method"
        )
    return mask.nonzero()[:, 1].view(mask.shape[0], int(counts[0]))
