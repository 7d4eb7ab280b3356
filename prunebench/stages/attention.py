"""Attention rows recomputed from a layer's own q/k, so SDPA / FlashAttention stay on.

A method that needs "how much does the last prompt token attend to each visual token at layer
K-1" gets exactly the row eager attention would have produced, without `output_attentions`, a
second forward, or files (METHODS.md §0.3; PyramidDrop `pdrop_rank_drop` does the same).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RopeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def query_rows_attention(
    q_rows: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q·Kᵀ·scale) for a few query rows, averaged over heads.

    q_rows: [B, H, R, d] (post-RoPE); keys: [B, Hkv, L, d] (post-RoPE; Hkv divides H, GQA);
    key_mask: [B, L] bool, False for padding. Returns [B, R, L] in float32.
    Causality is the caller's business: pass rows whose keys all precede them (e.g. the last token).
    """
    b, h, _, d = q_rows.shape
    groups = h // keys.shape[1]
    k = keys.float().repeat_interleave(groups, dim=1)  # [B, H, L, d]
    logits = torch.einsum("bhrd,bhld->bhrl", q_rows.float(), k) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def last_query_attention(
    q_proj_out: torch.Tensor,
    k_proj_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    head_dim: int,
    scale: float,
    apply_rope: RopeFn,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean attention row of the last token of a decoder layer: [B, L].

    q_proj_out: [B, L, H*d], k_proj_out: [B, L, Hkv*d] (the projections' outputs, pre-RoPE);
    cos/sin: [B, L, d] the layer's rotary embeddings; apply_rope(x [B,h,T,d], cos, sin) -> x.
    """
    b, length, _ = q_proj_out.shape
    q = q_proj_out[:, -1:].view(b, 1, -1, head_dim).transpose(1, 2)  # [B, H, 1, d]
    k = k_proj_out.view(b, length, -1, head_dim).transpose(1, 2)  # [B, Hkv, L, d]
    q = apply_rope(q, cos[:, -1:], sin[:, -1:])
    k = apply_rope(k, cos, sin)
    return query_rows_attention(q, k, scale, key_mask)[:, 0]


def position_query_attention(
    q_proj_out: torch.Tensor,
    k_proj_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query: torch.Tensor,
    *,
    head_dim: int,
    scale: float,
    apply_rope: RopeFn,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean causal attention row of the token at position query[b] of each row: [B, L].

    As `last_query_attention`, for any query position (FastV_VIS: the last visual token); keys after
    the query are masked as the causal mask does, so entries past query[b] are 0. query: [B] long.
    """
    b, length, _ = q_proj_out.shape
    at = query.to(q_proj_out.device).view(b, 1, 1)
    q = q_proj_out.gather(1, at.expand(b, 1, q_proj_out.shape[-1])).view(b, 1, -1, head_dim).transpose(1, 2)
    d = cos.shape[-1]
    q = apply_rope(q, cos.expand(b, -1, -1).gather(1, at.expand(b, 1, d)),
                   sin.expand(b, -1, -1).gather(1, at.expand(b, 1, d)))
    k = apply_rope(k_proj_out.view(b, length, -1, head_dim).transpose(1, 2), cos, sin)
    causal = torch.arange(length, device=q.device)[None] <= at.view(b, 1)  # [B, L]
    key_mask = causal if key_mask is None else causal & key_mask
    return query_rows_attention(q, k, scale, key_mask)[:, 0]


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """Mean attention each token RECEIVES: [B, H, T, d] q, k -> [B, T] float32.

    s_i = (1/H) (1/T) sum_h sum_j softmax_j'(q_j . k_j' * scale)[i]  (column mean over queries, heads).
    evoprune.txt §3.4 writes (1/N) sum_j A_ij, which is the constant 1/N since softmax rows sum to 1;
    its prose ("token i receives strong attention") defines the column mean, which we use.
    Float32, chunked over query rows: peak extra memory O(B * H * chunk * T).
    """
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(f"q and k must both be [B, H, T, d]; got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h, t, _ = q.shape
    qf, kt = q.float(), k.float().transpose(-1, -2)
    total = torch.zeros(b, t, dtype=torch.float32, device=q.device)
    for start in range(0, t, max(int(chunk), 1)):
        probs = torch.softmax((qf[:, :, start : start + chunk] @ kt) * scale, dim=-1)  # [B, H, c, T]
        total += probs.sum(dim=(1, 2))
    return total / (h * t)


def rows_attention_per_head(
    q_proj_out: torch.Tensor,
    k_proj_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    *,
    head_dim: int,
    scale: float,
    apply_rope: RopeFn,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head causal softmax rows of the query tokens at `rows`: [B, H, R, L] float32.

    q_proj_out: [B, L, H*d], k_proj_out: [B, L, Hkv*d] (pre-RoPE); cos/sin: [B|1, L, d]; rows: [B, R] long.
    Row r attends to keys 0..rows[b, r] (the causal mask), and not to padding (key_mask [B, L] bool).
    Only R rows are formed, never the L x L map (SparseVLM's rater rows, METHODS.md §0.3).
    """
    b, length, _ = q_proj_out.shape
    r = rows.shape[1]
    at = rows.to(q_proj_out.device)
    q = q_proj_out.gather(1, at[..., None].expand(b, r, q_proj_out.shape[-1]))
    q = q.view(b, r, -1, head_dim).transpose(1, 2)  # [B, H, R, d]
    d = cos.shape[-1]
    q = apply_rope(q, cos.expand(b, -1, -1).gather(1, at[..., None].expand(b, r, d)),
                   sin.expand(b, -1, -1).gather(1, at[..., None].expand(b, r, d)))
    k = apply_rope(k_proj_out.view(b, length, -1, head_dim).transpose(1, 2), cos, sin)
    k = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.einsum("bhrd,bhld->bhrl", q.float(), k) * scale
    allowed = torch.arange(length, device=q.device)[None, None, :] <= at[..., None]  # [B, R, L]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, :]
    return logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)


def rope_prior(cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *, scale: float,
               apply_rope: RopeFn) -> torch.Tensor:
    """RoPE-only attention logits: q = k = all-ones vectors rotated at their positions, q·k * scale.

    cos/sin: [B|1, L, d]; rows: [B, R], cols: [B, C] long. Returns [B, R, C] float32 (SparseVLM+ §4.2,
    the "attention gravity" that only positions produce; the same for every head).
    """
    b = rows.shape[0]
    d = cos.shape[-1]
    ones = torch.ones(b, 1, cos.shape[-2], d, dtype=torch.float32, device=cos.device)
    rotated = apply_rope(ones, cos.float().expand(b, -1, -1), sin.float().expand(b, -1, -1))[:, 0]  # [B, L, d]
    q = rotated.gather(1, rows.to(cos.device)[..., None].expand(-1, -1, d))
    k = rotated.gather(1, cols.to(cos.device)[..., None].expand(-1, -1, d))
    return torch.einsum("brd,bcd->brc", q, k) * scale
