"""EvoPrune (Chen et al. 2026, arXiv 2603.03681; papers/evoprune.txt; no public code).

Inside the vision encoder, at the layers of a budget schedule (§3.2, Appendix A; default `skip`),
r_l tokens are merged between self-attention and the MLP (Algorithm 1) by a ToMe-style bipartite
step whose pair score is similarity x diversity penalty x attention preservation (§3.3-3.4).
The math lives in `evoprune_ops.py`; the stage hooks are in `stages/vision.py`.
"""

from __future__ import annotations

from prunebench.checks import Kind
from prunebench.methods.base import METHODS, MethodSpec, Positions, Stage
from prunebench.methods.evoprune_ops import evoprune_merge
from prunebench.methods.merge_ops import MERGE_POINTS, layer_schedule

METHODS.add(
    "evoprune",
    MethodSpec(
        name="evoprune",
        stage=Stage.VISION,
        source="papers/evoprune.txt §3.2-3.4, Algorithm 1, Appendix A (no official code)",
        schedule=layer_schedule,
        merge=evoprune_merge,
        needs=frozenset({"received_attention"}),
        dtype="float32 (similarity, diversity, importance ranking, size-weighted mean)",
        rounding="sum of r_l = N - round(keep*N) (n_keep_for, half up); per-layer r_l by largest remainder",
        positions=Positions.CONTIGUOUS,  # merged tokens enter the LLM as a shorter image run
        defaults={"schedule": "skip", "ctr": 0.25, "knn": 5, "tau": 1.0, "lambda_d": 1.0, "merge_point": "attention"},
        kinds={"merge_point": Kind("str", choices=MERGE_POINTS)},
        deviations=(
            "attention importance = mean attention RECEIVED (column mean over queries and heads); the paper's "
            "formula averages rows, which is constant 1/N (METHODS.md EvoPrune card)",
            "w_attn = -inf applied as a mask on protected pairs (a product with a negative similarity would flip sign)",
            "diversity kNN and Gaussian kernel on L2-normalised features (tau is scale-free); K=5, tau=1, "
            "lambda_d=1 are our defaults: the paper leaves them open",
            "[CLS] is never merged; N_protect counts patch tokens only",
            "schedule runs over the encoder layers that feed the selected features (LLaVA-1.5: 23 of 24 CLIP layers); "
            "a layer asked to merge more than half its tokens passes the excess to an earlier layer",
            "when fewer than r unprotected a-tokens (or no unprotected b-token) remain, the least important "
            "importance-protected tokens of the short parity are un-protected until r merges are possible "
            "(evoprune_ops._make_feasible; not in the paper)",
            "no proportional attention (the paper does not use it)",
            "merged tokens are ordered by the original index of their representative (the surviving b token)",
            "Qwen2.5-VL/Qwen2-VL: merges whole 2x2 merge units (4 ViT rows, one LLM token); unit feature = "
            "mean of its rows, importance = mean attention its rows receive per attention segment (window or "
            "image); budget and schedule per image / video slice over all ViT blocks (families/qwen/vision.py)",
            "InternVL3: merges whole pixel-shuffle groups (2x2 patches, one LLM token) inside InternViT, per tile "
            "(families/internvl/vision.py); "
            "LLaVA-NeXT: per view (base image and crops), round(keep*576) before unpadding; LLaVA-OneVision/Video "
            "videos: per frame, round(keep*pooled count), merges replace HF's bilinear pooling",
        ),
    ),
)
