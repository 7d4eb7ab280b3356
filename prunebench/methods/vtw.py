"""VTW, visual tokens withdrawal (Lin et al., AAAI 2025, "Boosting multimodal large language models with
visual tokens withdrawal for rapid inference"; official repo lzhxmu/VTW,
`llava/model/language_model/VTW.py` `VTWLlamaModel.forward`, `pe_type="keep"`).

At LLM layer K, during prefill, every visual token is deleted from the hidden states: layers >= K,
and decoding at those layers, never see them; the other tokens keep their original positions.

There is no per-token budget. The harness maps keep to the operating point whose layer-averaged
visual count is keep*N: K = round(keep * L) (keep=1.0 -> K = L -> nothing withdrawn), unless the
`layer` parameter fixes K (e.g. the one `scripts/vtw_findk.py` calibrates: method.params.layer=K).
Records: n_visual_out = 0 (N when K = L), layer_avg = N*K/L.
"""

from __future__ import annotations

import math

import torch

from prunebench.errors import UserError
from prunebench.methods.base import Positions, SelectContext, Stage, register_method


def vtw_layer(keep: float, n_layers: int, *, layer: int | None = None) -> int:
    """K for a keep fraction on an LLM of n_layers layers: round-half-up(keep * L), or `layer`."""
    if layer is None:
        return math.floor(keep * n_layers + 0.5)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_layers:
        raise UserError(f"vtw: layer must be null (K = round(keep*L)) or an integer in 0..{n_layers} "
                        f"(L = {n_layers}: nothing withdrawn), got {layer!r}")
    return layer


def vtw_budget(n_in: int, n_keep: int, **_: object) -> int:
    """No visual token survives layer K (when K = L the stage is not installed and all N stay)."""
    return 0


@register_method(
    "vtw",
    stage=Stage.INTRA_LLM,
    source="Lin et al. AAAI 2025 (VTW); lzhxmu/VTW llava/model/language_model/VTW.py VTWLlamaModel.forward",
    dtype="no scoring (every visual token withdrawn at layer K)",
    rounding="no token count: K = round(keep*L) (half up; layer=K overrides keep), all N withdrawn at K",
    positions=Positions.ORIGINAL,  # pe_type="keep", the official default
    defaults={"layer": None},
    budget=vtw_budget,
    layer_for_keep=vtw_layer,
    deviations=(
        "operating point from keep: K = round(keep*L) so that the layer-averaged visual count N*K/L is "
        "keep*N; the official K is a calibrated layer (`--findk`, K=15/16 for LLaVA-1.5-7B): pass it as "
        "method.params.layer (scripts/vtw_findk.py)",
        "the visual rows come from the image-token ids of the prompt (any span, any family), not the "
        "hard-coded [35, 611) of LLaVA-1.5",
        "an explicit layer ignores keep (the record's notes state the K that ran); K=0 (withdraw before the "
        "first layer) is allowed, K=L withdraws nothing (no hooks installed)",
        "batch rows must hold the same number of visual tokens (as every intra-LLM method here)",
    ),
)
def vtw(ctx: SelectContext, layer: int | None) -> torch.Tensor:
    """Withdraw every visual token: [B, N, D] tokens -> [B, 0] kept indices."""
    del layer  # consumed by the intra-LLM stage (vtw_layer)
    return torch.empty(ctx.tokens.shape[0], 0, dtype=torch.long, device=ctx.tokens.device)
