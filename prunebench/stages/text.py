"""The prompt's text as a pre-LLM method sees it (signal `text_embeddings`), at the LLM entry.

During `generate`, the projector output (the pre-LLM seam) is computed before the text is embedded
into the sequence, so text-conditioned methods (CDPruner, adaptive_mi) select at the LLM entry,
where `inputs_embeds` holds both. Pure functions on the entry's tensors.
"""

from __future__ import annotations

import torch


def text_rows(image_mask: torch.Tensor, mask2d: torch.Tensor | None) -> list[torch.Tensor]:
    """[B, L] visual-token mask (+ [B, L] padding mask) -> per batch row, the sequence rows of its text.

    The text is what follows the row's last visual token (the question and the template's assistant
    prefix), padding excluded; when nothing follows (the image closes the prompt) it is every
    non-visual token of the row.
    """
    attended = torch.ones_like(image_mask) if mask2d is None else mask2d.bool()
    out = []
    for visual, valid in zip(image_mask, attended, strict=True):
        text = ~visual & valid
        where = visual.nonzero()
        after = text.clone()
        if where.numel():
            after[: int(where[-1, 0]) + 1] = False
        out.append((after if bool(after.any()) else text).nonzero()[:, 0])
    return out


def unit_batch_rows(image_mask: torch.Tensor, sizes: list[int]) -> list[int]:
    """The batch row of each visual unit (image, view or frame), given the units' token counts in
    scatter order (row-major over the [B, L] visual placeholders)."""
    flat = image_mask.flatten().nonzero()[:, 0]
    if flat.numel() != sum(sizes):
        raise RuntimeError(f"prunebench: {flat.numel()} visual placeholders but the visual seam gave {sum(sizes)}")
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    return [int(flat[s]) // image_mask.shape[1] for s in starts.tolist()]


def text_embeddings(embeds: torch.Tensor, image_mask: torch.Tensor, mask2d: torch.Tensor | None,
                    sizes: list[int]) -> list[torch.Tensor]:
    """inputs_embeds [B, L, D] -> per visual unit, [1, M, D] embeddings of its prompt's text."""
    rows = text_rows(image_mask, mask2d)
    if any(r.numel() == 0 for r in rows):
        raise RuntimeError("prunebench: a text-conditioned method got a prompt with no text tokens")
    return [embeds[b, rows[b]][None] for b in unit_batch_rows(image_mask, sizes)]
