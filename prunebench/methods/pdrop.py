"""PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: accelerating your large vision-language models via
pyramid visual redundancy reduction"; official repo Cooperx521/PyramidDrop,
`llava/model/modeling_llama_pdrop.py` `LlamaModel.forward` + `pdrop_rank_drop`).

The LLM is split into stages at layers [8, 16, 24] (of 32). Entering stage layer K_s, layer K_s's own
`input_layernorm`, q/k projections and RoPE are applied to the incoming hidden states, for the last
instruction token's query only (the inference path); its softmax row over all keys, averaged over heads
and sliced to the surviving visual tokens, ranks them. The top floor(N * lambda^s) are kept in order
(N = visual tokens entering the LLM, fractions of the original N); positions are renumbered contiguously
and decode positions shifted to match (official).
"""

from __future__ import annotations

import math

import torch

from prunebench.errors import UserError
from prunebench.methods.base import (
    IntraSchedule,
    Positions,
    SelectContext,
    Stage,
    layer_average,
    register_method,
    top_k_sorted,
)
from prunebench.methods.schedule_ops import closest_step

PAPER_LAYERS = 32  # LLaVA-1.5-7B: stages at 8 / 16 / 24
PAPER_STAGE_LAYERS = (8, 16, 24)


def pdrop_layers(n_layers: int, layers: list[int] | None = None, **_: object) -> list[int]:
    """The stage layers: given, or the paper's [8, 16, 24] of 32 scaled to n_layers (round-half-up of
    K * n_layers / 32, i.e. L/4, L/2, 3L/4)."""
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(k, int) for k in layers):
            raise UserError(f"pdrop: layers must be null or a non-empty list of layer indices, got {layers!r}")
        return list(layers)
    return [max(1, math.floor(k * n_layers / PAPER_LAYERS + 0.5)) for k in PAPER_STAGE_LAYERS]


def stage_counts(n_in: int, n_stages: int, lam: float) -> list[int]:
    """floor(N * lambda^s) for s = 1..S (at least one token: our n_keep >= 1 convention)."""
    return [max(1, math.floor(n_in * lam**s)) for s in range(1, n_stages + 1)]


def solve_lambda(n_layers: int, layers: list[int], n_in: int, target: float) -> float:
    """The lambda in [0, 1] whose floored schedule's layer average is closest to `target` visual tokens."""

    def avg(lam: float) -> float:
        return layer_average(n_layers, n_in, list(zip(layers, stage_counts(n_in, len(layers), lam), strict=True)))

    return closest_step(avg, target, 0.0, 1.0)


def pdrop_counts(n_layers: int, stages: list[int], n_in: int, n_keep: int, **_: object) -> list[int]:
    """Kept visual tokens per stage (layers `stages`) for the budget n_keep, read as the layer-averaged count."""
    return stage_counts(n_in, len(stages), solve_lambda(n_layers, stages, n_in, float(n_keep)))


@register_method(
    "pdrop",
    stage=Stage.INTRA_LLM,
    source="Xing et al. 2025 §3.2-3.3 (PyramidDrop); Cooperx521/PyramidDrop llava/model/modeling_llama_pdrop.py "
    "pdrop_rank_drop (inference: last instruction token as query, image_token_ratio_list [1, l, l^2, l^3])",
    needs=("layer_last_query_attention",),
    dtype="layer K's input_layernorm, q (last token) / k projections and RoPE in the model's dtype; q.k logits, "
    "softmax and head mean in float32 (stages/attention.py upcasts q and k)",
    rounding="keep read as the layer average: lambda solved (bisection) so the average is closest to "
    "round(keep*N); stage s keeps max(1, floor(N*lambda^s))",
    positions=Positions.CONTIGUOUS,
    defaults={"layers": None},
    intra=IntraSchedule(layers=pdrop_layers, counts=pdrop_counts),
    deviations=(
        "a budget below one token per stage from K_1 on is unreachable (32 layers, [8, 16, 24], N=576: layer "
        "average >= 144.75, i.e. keep <= 0.222): the installation flags it `budget unreachable`; layer sets "
        "[K, 2K, 3K] reaching 192 / 128 / 64 of 576 on 32 layers with lambda nearest the paper's 0.5 "
        "(pdrop_counts): layers=[5,10,15] (lambda 0.491, avg 192.06), [2,4,6] (0.516, 128.31), [1,2,3] "
        "(0.411, 63.75)",
        "GQA: the last-query attention repeats each key head over its query group (repeat_kv, "
        "stages/attention.py); the official PyramidDrop code has no repeat_kv and would fail on GQA models",
        "budget: keep is read as the layer-averaged visual count (METHODS.md §0.2): lambda is solved so that "
        "(K_1*N + sum_s (K_{s+1}-K_s) * floor(N*lambda^s)) / L is closest to round(keep*N) (bisection; the paper's "
        "default lambda = 0.5 is keep = 0.469 at 576 tokens / 32 layers); lambda is not a parameter",
        "stage layers: the paper's [8, 16, 24] of 32 scaled to L layers as round(K*L/32) (L/4, L/2, 3L/4; "
        "[1, 2, 3] on a 4-layer model) unless `layers` is given",
        "each stage keeps at least one visual token (floor(N*lambda^s) may be 0 in the official code); a budget "
        "below K_1*N/L (144 of 576 at the default layers of a 32-layer model) cannot be reached as a layer "
        "average: lambda -> 0 keeps 1 token per stage and the record's layer_avg shows the real average "
        "(move the layers to reach it, as the paper suggests)",
        "the query row is formed for the last prompt token only and softmaxed over all keys in float32 "
        "(official: the row of prompt_len + image_tokens - 1 after padding removal, the same token at batch 1)",
        "dtype: q.k logits, softmax and head mean in float32 (q, k upcast after RoPE); official pdrop_rank_drop "
        "takes the logits in the model's dtype (fp16), softmaxes in float32 and casts the probabilities back to "
        "the model's dtype before the head mean and topk, which can change the kept set under fp16/bf16",
        "the official `self.image_tokens` count is per sample from the LLaVA prompt; here N is the number of "
        "visual placeholder tokens entering the LLM (all images of the prompt ranked together)",
    ),
)
def pdrop(ctx: SelectContext, layers: list[int] | None) -> torch.Tensor:
    """signals['layer_last_query_attention']: [B, N_s] -> [B, n] top-n indices, sorted."""
    del layers  # consumed by the intra-LLM stage
    scores = ctx.signals["layer_last_query_attention"]
    return top_k_sorted(scores, ctx.n_keep)
