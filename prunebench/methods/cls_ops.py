"""Pure tensor functions of the ViT [CLS]-attention pre-LLM methods (FasterVLM, VisPruner, HoloV).

They know no model: visual tokens [N, D] (or [B, N, D]) and a per-token attention score [N] in,
kept indices out. The hooks (`stages/vision.py`, `stages/vision_signals.py`) supply the scores.
"""

from __future__ import annotations

import math

import torch


def vispruner_select(attention: torch.Tensor, features: torch.Tensor, k: int, important_ratio: float,
                     fp32: bool = False) -> torch.Tensor:
    """VisPruner (Theia-4869/VisPruner `llava_arch.py encode_images`) for one image.

    attention [N] (head-mean [CLS] attention), features [N, C] (the tokens whose cosine similarity
    measures duplication), k = T kept tokens. T_imp = int(T * r) tokens of highest attention are
    important; the rest (in attention-descending order) are deduplicated: split alternately into
    A (even positions) and B (odd), drop the min(8, R - T_div) tokens of A whose best cosine match
    in B is highest, and continue on [A survivors in descending max-similarity order, B] until
    T_div = T - T_imp remain. The cosine is computed in the features' dtype, as the official code
    (the model's dtype); fp32=True upcasts first. Returns [k] sorted indices.
    """
    n_imp = int(k * important_ratio)
    n_div = k - n_imp
    order = attention.argsort(descending=True, stable=True)
    important, residual = order[:n_imp], order[n_imp:]
    f = features.float() if fp32 else features
    unit = f / f.norm(dim=-1, keepdim=True)
    if residual.numel() - n_div <= 0:
        return torch.cat([important, residual]).sort().values
    # The official loop recomputes unit[A] @ unit[B].T every 8 removals (O(R^2 C) each time); the same cosines
    # are read off one R x R matrix of the residual tokens (local indices), unless it would not fit in memory.
    if residual.numel() > SIM_LIMIT:
        return torch.cat([important, residual[_dedup_by_gemm(unit[residual], n_div)]]).sort().values
    sim = unit[residual] @ unit[residual].T
    return torch.cat([important, residual[_dedup_by_neighbours(sim, n_div)]]).sort().values


# Residual tokens up to which VisPruner's cosines come from one precomputed matrix (16,384^2 fp32 = 1 GiB).
SIM_LIMIT = 16_384
# Each residual token's most similar residual tokens kept, in descending order, for the max over B.
NEIGHBOURS = 64


def _dedup_by_gemm(unit: torch.Tensor, n_div: int) -> torch.Tensor:
    """The official rounds (unit: [R, C] residual tokens in attention order), one GEMM of A x B per round; the
    surviving local indices in their final order."""
    local = torch.arange(unit.shape[0], device=unit.device)
    while (r := min(8, local.numel() - n_div)) > 0:
        a, b = local[::2], local[1::2]
        best = (unit[a] @ unit[b].T).amax(dim=-1)  # [|A|] each A token's most similar B token
        local = torch.cat([a[best.argsort(descending=True, stable=True)[r:]], b])
    return local


def _dedup_by_neighbours(sim: torch.Tensor, n_div: int) -> torch.Tensor:
    """The same rounds on the residual tokens' cosine matrix sim [R, R], without gathering A x B each round.

    An A token's best match in B is the first of its NEIGHBOURS most similar tokens (sorted, descending) that is
    in B now: no token outside that list is more similar, so the value is exactly the max over B, ties included.
    Rows whose list holds no B token (late rounds, when their near tokens are gone) take the max over B directly.
    """
    n = sim.shape[0]
    near_sim, near = sim.topk(min(NEIGHBOURS, n), dim=1)  # [R, K] descending
    local = torch.arange(n, device=sim.device)
    in_b = torch.zeros(n, dtype=torch.bool, device=sim.device)
    while (r := min(8, local.numel() - n_div)) > 0:
        a, b = local[::2], local[1::2]
        in_b.zero_()
        in_b[b] = True
        hit = in_b[near[a]]  # [|A|, K]
        best = near_sim[a].gather(1, hit.to(torch.uint8).argmax(dim=1, keepdim=True)).squeeze(1)
        missed = (~hit.any(dim=1)).nonzero().squeeze(1)
        if missed.numel():
            best[missed] = sim.index_select(0, a[missed]).index_select(1, b).amax(dim=-1)
        local = torch.cat([a[best.argsort(descending=True, stable=True)[r:]], b])
    return local


def holov_chunks(n: int, p: int) -> list[tuple[int, int]]:
    """P contiguous 1-D chunks of n tokens, the first n % P one token longer (HoloV `utils.py`);
    empty chunks are skipped. Returns (start, end) pairs."""
    size, extra = divmod(n, p)
    bounds, start = [], 0
    for i in range(p):
        end = start + size + (1 if i < extra else 0)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


def holov_chunk_count(n: int, k: int) -> int:
    """P = max(1, floor((1024/576) * N / k)) chunks (METHODS.md HoloV; 16 at N=576, k=64), at most N."""
    return min(n, max(1, math.floor(1024 / 576 * n / k)))


def holov_chunk_score(tokens: torch.Tensor, attention: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """Mean token score of one chunk: tokens [n, D], attention [n] -> scalar (float32).

    s_i = 1000 a_i + alpha * c * var_i, var_i = the variance of row i of the cosine-similarity
    matrix with its diagonal set to 0 (the zeroed diagonal stays in the sum, divisor n-1, as the
    official code), c = mean|1000 a| / (mean|var| + eps). A chunk of one token scores its attention.
    """
    n = tokens.shape[0]
    if n <= 1:
        return attention.float().mean()
    unit = tokens.float() / (tokens.float().norm(dim=1, keepdim=True) + eps)
    sim = (unit @ unit.T) * (1 - torch.eye(n, device=tokens.device))
    mean = sim.sum(dim=1) / (n - 1)
    var = ((sim - mean[:, None]) ** 2).sum(dim=1) / (n - 1)
    scaled = attention.float() * 1e3
    c = scaled.abs().mean() / (var.abs().mean() + eps)
    return (scaled + alpha * var * c).mean()


def holov_allocate(scores: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """Chunk budgets: floor(k * score_p / (sum + eps)), the remainder +1 each to the top chunks."""
    weights = scores / (scores.sum() + eps)
    budget = (weights * k).floor().long()
    remaining = k - int(budget.sum())
    if remaining > 0:
        budget[torch.topk(weights, min(remaining, weights.numel())).indices] += 1
    return budget


def holov_select(tokens: torch.Tensor, attention: torch.Tensor, k: int, n_chunks: int, alpha: float) -> torch.Tensor:
    """HoloV (obananas/HoloV `llava/model/utils.py HoloV`) for one image: tokens [N, D], attention [N]
    -> [k] sorted indices. Within each chunk the top-budget tokens by attention are kept (a chunk
    whose budget reaches its size is kept whole); a shortfall (budgets beyond a chunk's size, or a
    remainder larger than the chunk count), which the official code pads with zero tokens, is filled
    with the highest-attention tokens not yet kept."""
    bounds = holov_chunks(tokens.shape[0], n_chunks)
    scores = torch.stack([holov_chunk_score(tokens[s:e], attention[s:e], alpha) for s, e in bounds])
    budget = holov_allocate(scores, k).tolist()
    kept = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for (s, e), b in zip(bounds, budget, strict=True):
        if b > 0:
            kept[s + attention[s:e].topk(min(b, e - s)).indices] = True
    short = k - int(kept.sum())
    if short > 0:
        rest = attention.float().masked_fill(kept, float("-inf"))
        kept[rest.topk(short).indices] = True
    return kept.nonzero()[:, 0]
