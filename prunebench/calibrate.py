"""Calibration of VTW's withdrawal layer K (the official `--findk`, lzhxmu/VTW
`llava/model/language_model/VTW.py`: `temp_cache.findk`, `VTWLlamaForCausalLM.forward`).

On a few samples, compare the last prompt token's next-token distribution of the full model with
the one obtained when every visual token is withdrawn at layer k, for each candidate k; K is the
first (smallest) k whose mean KL divergence is <= eta (0.003 for LLaVA-1.5-7B, 0.0005 for 13B,
0.0001 for LLaVA-1.6-7B). Pass the result as `method.params.layer=K`.

KL direction: the official code calls `nn.KLDivLoss()(log_softmax(full), softmax(withdrawn))`, which is
KL(withdrawn || full); that is the default ("withdrawn"). direction="full" gives KL(full || withdrawn).
Each k runs the harness's own `vtw` method with `layer=k` (one forward per k and sample; the official
loop shares the layers below k between candidates, which changes time, not values).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from prunebench.errors import UserError
from prunebench.methods import resolve_method
from prunebench.seams import Seams
from prunebench.stages import install

DIRECTIONS = ("withdrawn", "full")


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per row: [B, V], [B, V] -> [B] float32 (>= 0)."""
    log_p, log_q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def candidate_layers(n_layers: int, first: int = 5) -> list[int]:
    """The official k = 5..L-1; a model too shallow for that range (tiny test models) scans 1..L-1."""
    start = first if first < n_layers - 1 else 1
    return list(range(start, n_layers))


def _last_logits(model: torch.nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def withdrawal_kl(seams: Seams, model: torch.nn.Module, inputs: Mapping[str, Any], layers: Iterable[int],
                  direction: str = "withdrawn") -> dict[int, float]:
    """KL between the full model and VTW at each layer k, for one prompt: {k: KL} (batch mean)."""
    if direction not in DIRECTIONS:
        raise UserError(f"KL direction must be one of: {', '.join(DIRECTIONS)} (got '{direction}')")
    full = _last_logits(model, inputs)
    out = {}
    for k in layers:
        with install(seams, resolve_method("vtw", {"layer": int(k)}), keep=1.0):
            withdrawn = _last_logits(model, inputs)
        pair = (withdrawn, full) if direction == "withdrawn" else (full, withdrawn)
        out[int(k)] = float(kl_divergence(*pair).mean())
    return out


def kl_curve(seams: Seams, model: torch.nn.Module, prompts: Iterable[Mapping[str, Any]], layers: Sequence[int],
             direction: str = "withdrawn") -> dict[int, float]:
    """Mean over prompts of `withdrawal_kl`: {k: mean KL}."""
    per_prompt = [withdrawal_kl(seams, model, p, layers, direction) for p in prompts]
    if not per_prompt:
        raise UserError("VTW calibration needs at least one sample")
    return {k: sum(kl[k] for kl in per_prompt) / len(per_prompt) for k in layers}


def choose_layer(curve: Mapping[int, float], eta: float, n_layers: int) -> int:
    """The first k (ascending) with mean KL <= eta; n_layers (withdraw nothing) when none qualifies."""
    return next((k for k in sorted(curve) if curve[k] <= eta), n_layers)
