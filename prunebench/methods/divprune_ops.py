"""DivPrune selection (Alvar et al., CVPR 2025; METHODS.md "DivPrune"). No model code here."""

from __future__ import annotations

import torch

_EPS = 1e-12


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """[B, N, D] -> [B, N, N] float32 distance 1 - cos(x_i, x_j)."""
    xf = x.float()
    xn = xf / xf.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return 1 - xn @ xn.transpose(1, 2)


def divprune_select(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity subset: [B, N, D] tokens -> [B, k] long indices, sorted ascending.

    Distance D = 1 - cosine (float32). First pick: the token whose nearest-neighbour distance
    (itself excluded) is largest; then repeatedly add argmax_j min_{s in S} D[s, j] over unselected j.
    Ties go to the lowest index (torch.argmax returns the first maximum).

    Checked against the official code (vbdi/divprune, LLaVA/llava/model/llava_arch.py,
    `LlavaMetaForCausalLM.DivPrune`): it builds 1 - cos in the features' dtype (fp16 in LLaVA),
    picks the first token by the second-smallest value of each column (`topk(.., 2, largest=False)
    .values[1]`, i.e. the nearest-neighbour distance, the diagonal being ~0), then takes
    `argmax(min over selected rows)` over ALL columns, and returns indices in pick order (the caller
    sorts them). One image at a time. Deviations here, all invisible on generic inputs:
    - the diagonal is excluded explicitly (official: relies on D[i, i] ~ 0 being the column min;
      with duplicate tokens or rounding noise the two can differ);
    - already selected tokens are masked out (official: never masked; a selected token has distance
      ~0 and is only re-picked when every remaining token duplicates a selected one, which would
      yield fewer than k distinct tokens);
    - float32 similarity regardless of the input dtype; zero vectors get cos 0 instead of NaN;
    - batched over B, and returns sorted indices.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D], got {tuple(x.shape)}")
    b, n, _ = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..N = 1..{n}, got {k}")
    dist = cosine_distance(x)
    rows = torch.arange(b, device=x.device)
    # Official first pick: second-smallest per column = nearest-neighbour distance.
    nn_dist = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf")).amin(dim=1)
    pick = nn_dist.argmax(dim=-1)  # N = 1: all inf, picks 0
    selected = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    min_to_set = torch.full((b, n), float("inf"), device=x.device)
    picks = []
    for _ in range(k):
        picks.append(pick)
        selected[rows, pick] = True
        min_to_set = torch.minimum(min_to_set, dist[rows, pick])  # min_{s in S} D[s, j]
        pick = min_to_set.masked_fill(selected, float("-inf")).argmax(dim=-1)
    return torch.stack(picks, dim=-1).sort(dim=-1).values
