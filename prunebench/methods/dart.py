"""DART, duplication-aware token reduction (Wen et al. 2025, "Stop looking for important tokens in
multimodal language models: duplication matters more", §3; official repo ZichenWen1/DART, read in
the fork xqy1111111/DART `llava/model/language_model/modeling_llama_self.py`
`DART.get_retained_image_token`).

At LLM layer K (default 2):
1. pivots: the `pivot_image` visual tokens and the `pivot_text` text tokens after the image with the
   largest L1 norm of their layer K-1 key states (post-RoPE, heads concatenated);
2. for each pivot in turn, the TOPK not-yet-chosen visual tokens whose hidden states (entering layer
   K, through the final norm) have the LOWEST cosine similarity to the pivot's are added; the pivots
   are visited in the official order, `list(set(image_indices + query_indices))` of their sequence
   indices (CPython's int-set order: deterministic, a function of the index values and the top-k
   insertion order; `pivot_order=set`), or image pivots then text pivots in sequence order
   (`pivot_order=sequence`, this harness's former order);
3. image pivots stay, text pivots are never visual tokens to keep; kept tokens keep their original
   positions. TOPK = floor((k - pivot_image) / (pivot_image + pivot_text)), so
   kept = pivot_image + 8 * TOPK = 4 + 8 * floor((k - 4) / 8) with the defaults (`dart_budget`).
"""

from __future__ import annotations

import torch

from prunebench.checks import Kind
from prunebench.errors import UserError
from prunebench.methods.base import Positions, SelectContext, Stage, register_method


def _check(pivot_image: int, pivot_text: int) -> None:
    if int(pivot_image) != pivot_image or int(pivot_text) != pivot_text or pivot_image < 1 or pivot_text < 0:
        raise UserError(f"dart: pivot_image must be an integer >= 1 and pivot_text an integer >= 0 "
                        f"(paper: 4 and 4), got {pivot_image} and {pivot_text}")


def dart_budget(n_in: int, n_keep: int, *, pivot_image: int = 4, pivot_text: int = 4, **_: object) -> int:
    """Documented kept count: p + (pivot_image + pivot_text) * TOPK, p = min(pivot_image, n_keep),
    TOPK = floor((n_keep - p) / (pivot_image + pivot_text)); n_in when n_keep >= n_in (keep=1.0)."""
    _check(pivot_image, pivot_text)
    if n_keep >= n_in:
        return n_in
    p = min(pivot_image, n_keep)
    return p + (pivot_image + pivot_text) * ((n_keep - p) // (pivot_image + pivot_text))


PIVOT_ORDERS = ("set", "sequence")


def check_pivot_order(pivot_order: object) -> str:
    if pivot_order not in PIVOT_ORDERS:
        raise ValueError(f"dart_select: pivot_order must be one of {PIVOT_ORDERS}, got {pivot_order!r}")
    return str(pivot_order)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest, largest first (the order `topk(...).indices` lists them; ties to the lower index)."""
    return scores.sort(descending=True, stable=True).indices[:k]


def official_visit_order(image_pivots: list[int], text_pivots: list[int]) -> list[int]:
    """The official loop's pivot order: `for item in list(indices_set)`, indices_set =
    `set(image_indices + query_indices)` of sequence indices, each list in top-k order. The Python set is
    built literally: its iteration order is CPython's (int hash = value, table slots, insertion order)."""
    return list(set(image_pivots + text_pivots))


def dart_select(
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    pivot_image: int,
    pivot_text: int,
    per_pivot: int,
    pivot_order: str = "set",
    image_index: torch.Tensor | None = None,
    text_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """One prompt. image_keys [N, C], text_keys [M, C] (layer K-1 post-RoPE keys, heads concatenated);
    image_feats [N, D], text_feats [M, D] (normed hidden states); image_index [N], text_index [M]: their
    sequence indices in the prompt (needed by pivot_order="set"). Returns [p + P * per_pivot] sorted
    visual indices, p = min(pivot_image, N), P = p + min(pivot_text, M) pivots.

    pivot_order "set": the official visit order (`official_visit_order`); "sequence": image pivots first,
    then text pivots, each in sequence order.
    """
    n = image_keys.shape[0]
    img_top = _top(image_keys.float().abs().sum(-1), min(pivot_image, n))
    txt_top = _top(text_keys.float().abs().sum(-1), min(pivot_text, text_keys.shape[0]))
    if check_pivot_order(pivot_order) == "set":
        if image_index is None or text_index is None:
            raise ValueError("dart_select: pivot_order='set' needs the pivots' sequence indices")
        feat_of = dict(zip(image_index[img_top].tolist(), image_feats[img_top], strict=True))
        feat_of.update(zip(text_index[txt_top].tolist(), text_feats[txt_top], strict=True))
        order = official_visit_order(image_index[img_top].tolist(), text_index[txt_top].tolist())
        pivots = torch.stack([feat_of[i] for i in order]).float()  # [P, D]
    else:
        pivots = torch.cat([image_feats[img_top.sort().values], text_feats[txt_top.sort().values]]).float()
    feats = image_feats.float()
    free = torch.ones(n, dtype=torch.bool, device=feats.device)
    free[img_top] = False
    chosen = [img_top]
    for pivot in pivots:
        cos = torch.nn.functional.cosine_similarity(pivot[None], feats, dim=-1)
        cos = cos.masked_fill(~free, float("inf"))  # only tokens nobody has chosen yet
        pick = (-cos).topk(per_pivot).indices  # the LEAST similar: duplicates of the pivot are dropped
        free[pick] = False
        chosen.append(pick)
    return torch.cat(chosen).sort().values


@register_method(
    "dart",
    stage=Stage.INTRA_LLM,
    source="Wen et al. 2025 §3 (DART); ZichenWen1/DART (fork xqy1111111/DART) "
    "llava/model/language_model/modeling_llama_self.py get_retained_image_token",
    needs=("layer_keys", "normed_hidden", "visual_rows", "text_after_visual", "sequence_index"),
    dtype="layer K-1 post-RoPE keys and normed hidden states in the model's dtype; L1 norms and cosines in "
    "float32",
    rounding="k = round(keep*N) at layer K (n_keep_for); kept = p + P*floor((k - p)/P), p = min(pivot_image, k), "
    "P = pivot_image + pivot_text (4 + 8*floor((k-4)/8), dart_budget); keep=1.0 keeps all",
    positions=Positions.ORIGINAL,  # the official code sets position_ids = kept original indices
    defaults={"layer": 2, "pivot_image": 4, "pivot_text": 4, "pivot_order": "set"},
    kinds={"pivot_order": Kind("str", choices=PIVOT_ORDERS)},
    cost="one cosine pass over the N x D hidden states per pivot (8 pivots, the official per-pivot loop): at 576 "
    "tokens 2-4x the (small) N x N cosine matrix; 0.8x of it at 2,880 and 0.2x at 10,816 "
    "(scripts/bench_selection.py, one CPU thread)",
    budget=dart_budget,
    deviations=(
        "budget: TOPK = floor((k - 4) / 8) from the harness budget k = round(keep*N), so kept = "
        "4 + 8*TOPK <= k (the official TOPK = floor(max_num_trunction / 8) keeps 4 more than the setting, "
        "e.g. 132 for 128); keep=1.0 (k = N) keeps every token",
        "k < 12: TOPK = 0 and only the min(4, k) image pivots are kept (pivot count capped at k)",
        "fewer than pivot_text text tokens after the image: that many text pivots, so fewer tokens are kept "
        "(the record counts what was kept); the official topk would fail",
        "pivot_order=set (default) visits the pivots in the official list(set(...)) order of their sequence indices "
        "in the prompt, padding not counted; pivot_order=sequence (this harness's former order: image pivots, then "
        "text pivots, each ascending) changes which pivot claims a shared neighbour (6-15 % of the kept set on a "
        "random 8-layer model)",
        "the set order depends on the indices the harness's prompt gives the pivots; a template or a pipeline "
        "stage before DART that moves the image moves them, as it would in the official code",
        "L1 norms and cosines in float32; with GQA the keys are the Hkv heads, not repeat_kv'd copies (the "
        "L1 norm scales by the group count, so the ranking is the same)",
        "several images / packed tiles / video frames: all visual tokens of the prompt form one candidate "
        "set (as the official LLaVA-NeXT path), the text pivots come after the last visual token",
        "LLaVA-NeXT / OneVision: the budget is round(keep*N) of all packed visual tokens, not the official "
        "fixed retain_token_num_for_llava_next=320; the Qwen2-VL path follows the LLaVA code (same signals "
        "from the model's own M-RoPE keys)",
    ),
)
def dart(ctx: SelectContext, layer: int, pivot_image: int, pivot_text: int, pivot_order: str = "set"
         ) -> torch.Tensor:
    """signals: layer_keys [B, L, C], normed_hidden [B, L, D], visual_rows [B, N], text_after_visual
    [B, L], sequence_index [B, L] -> [B, k'] kept visual indices, sorted; k' = dart_budget(N, ctx.n_keep)."""
    del layer  # consumed by the intra-LLM stage
    n = ctx.tokens.shape[1]
    n_out = dart_budget(n, ctx.n_keep, pivot_image=pivot_image, pivot_text=pivot_text)
    if n_out >= n:
        return torch.arange(n, device=ctx.tokens.device).expand(ctx.tokens.shape[0], n)
    p = min(pivot_image, ctx.n_keep)
    per_pivot = (n_out - p) // (pivot_image + pivot_text)
    sig = ctx.signals
    rows = []
    for b in range(ctx.tokens.shape[0]):  # greedy and per prompt, as the official (batch size 1) code
        vis, txt = sig["visual_rows"][b], sig["text_after_visual"][b]
        keys, feats = sig["layer_keys"][b], sig["normed_hidden"][b]
        index = sig["sequence_index"][b] if "sequence_index" in sig else torch.arange(keys.shape[0], device=keys.device)
        rows.append(dart_select(keys[vis], keys[txt], feats[vis], feats[txt], p, pivot_text, per_pivot,
                                pivot_order, index[vis], index[txt]))
    return torch.stack(rows)
