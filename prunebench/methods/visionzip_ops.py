"""VisionZip's dominant + contextual token selection as pure tensor functions (Yang et al., CVPR 2025
§3; dvlab-research/VisionZip `visionzip/clip_encoder.py` `CLIPVisionTower_VisionZip.forward`).

Knows no model: it takes the patch features, the [CLS] attention row over the patches and the
patches' keys of one encoder layer, and returns which patch slots carry the output tokens and
their values. The official code's [CLS] token is not among the candidates here (see the
`visionzip` method card for the accounting).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Official settings 54+10, 108+20, 162+30: the contextual share of the budget is 10/64 = 1/6.4.
CONTEXTUAL_SHARE = 10 / 64


def visionzip_split(k: int, contextual_share: float = CONTEXTUAL_SHARE) -> tuple[int, int]:
    """Budget k -> (dominant D, contextual C) with C = round-half-up(k * share), D = k - C.

    64 -> (54, 10), 128 -> (108, 20), 192 -> (162, 30): the official pairs.
    """
    c = math.floor(k * contextual_share + 0.5)
    return k - c, c


def contextual_targets(n_rest: int, n_contextual: int) -> torch.Tensor:
    """Positions (among the n_rest non-dominant tokens, in raster order) of the C merge targets:
    uniform with step max(1, n_rest // C), the first C (official `target_indices`)."""
    step = max(1, n_rest // n_contextual)
    return torch.arange(0, n_rest, step)[:n_contextual]


def visionzip_merge(
    x: torch.Tensor, attn: torch.Tensor, keys: torch.Tensor, n_dominant: int, n_contextual: int,
    groups: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dominant + contextual tokens of each image.

    x: [B, N, D] patch features; attn: [B, N] [CLS] attention to each patch (any positive scale:
    only its order matters); keys: [B, N, Dk] the patches' keys (the similarity metric).
    Returns (index [B, D+C] sorted slots, tokens [B, D+C, D]): a dominant token keeps its own
    slot and value; contextual token j sits at its target's slot with value
    x_target + mean(x of the tokens assigned to it) (0 when none is assigned), each non-dominant,
    non-target token being assigned to its most cosine-similar target by keys. `groups`, a list, receives
    [B, N]: the slot each token went into (its own for dominant and target tokens, its target's for the others).
    """
    b, n, _ = x.shape
    if not 0 < n_dominant + n_contextual <= n or n_dominant < 0 or n_contextual < 0:
        raise ValueError(f"visionzip: need 0 < D + C <= N, got D={n_dominant}, C={n_contextual}, N={n}")
    dominant = attn.topk(n_dominant, dim=1).indices if n_dominant else attn.new_zeros(b, 0, dtype=torch.long)
    is_dom = torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter_(1, dominant, True)
    rest = torch.arange(n, device=x.device).expand(b, n)[~is_dom].view(b, n - n_dominant)  # raster order
    out_index, out_tokens = [dominant], [x.gather(1, dominant[..., None].expand(-1, -1, x.shape[-1]))]
    slot = torch.arange(n, device=x.device).expand(b, n).clone()  # each token's output slot (for `groups`)
    if n_contextual:
        targets, values, others, choice = _contextual(x, keys, rest, n_contextual)
        out_index.append(targets)
        out_tokens.append(values)
        slot.scatter_(1, others, targets.gather(1, choice))
    if groups is not None:
        groups.append(slot)
    index = torch.cat(out_index, dim=1)
    order = index.argsort(dim=1)
    tokens = torch.cat(out_tokens, dim=1).gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    return index.gather(1, order), tokens


def _contextual(
    x: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor, n_contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rest [B, R] slots of the non-dominant tokens -> (target slots [B, C], values [B, C, D], the other slots
    [B, R-C], and the target each of them was assigned to [B, R-C], an index into the targets)."""
    r = rest.shape[1]
    local = contextual_targets(r, n_contextual).to(rest.device)
    is_target = torch.zeros(r, dtype=torch.bool, device=rest.device)
    is_target[local] = True
    targets, others = rest[:, local], rest[:, ~is_target]
    wide = torch.promote_types(x.dtype, torch.float32)  # half-precision features accumulate in fp32
    metric = F.normalize(_take(keys, rest).to(wide), dim=-1)
    sim = metric[:, ~is_target] @ metric[:, local].transpose(1, 2)  # [B, R-C, C]
    choice = sim.argmax(dim=2)  # [B, R-C]
    assign = F.one_hot(choice, n_contextual).to(wide)  # [B, R-C, C]
    counts = assign.sum(dim=1).clamp(min=1)[..., None]  # a target nobody chose adds 0
    aggregated = assign.transpose(1, 2) @ _take(x, others).to(wide) / counts
    values = (_take(x, targets).to(wide) + aggregated).to(x.dtype)
    return targets, values, others, choice


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows index [B, M] of t [B, N, D] -> [B, M, D]."""
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))
