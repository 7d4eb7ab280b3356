"""VisionZip (Yang et al., CVPR 2025 §3.2-3.3; official dvlab-research/VisionZip
`visionzip/clip_encoder.py` `CLIPVisionTower_VisionZip.forward`, `visionzip/utils.py`
`CLIPAttention_forward` (head-mean raw keys), `visionzip/main.py` (dominant includes [CLS])).

Per image, from one encoder layer (default: the selected feature layer, CLIP layer -2, as the
official `attentions[-2]`, `hidden_states[-2]` and `layers[-2].metric`):
- dominant: the top-D patches by [CLS] attention (head-mean here, head-sum officially: same order);
- contextual: C targets taken uniformly (step R // C) from the R remaining patches in raster order;
  every other remaining patch joins its most key-similar target (cosine of head-mean keys);
  contextual_j = x_target + mean(x of its members) (`visionzip_ops.visionzip_merge`).
Budget k = D + C with C = round(k * 10/64) (official 54+10, 108+20, 162+30).
The merge runs on the projector input (CLIP feature space, as the official code) where the family's
projector input is row-aligned with its output (LLaVA-1.5, InternVL), else on the projector output.
"""

from __future__ import annotations

import torch

from prunebench.errors import UserError
from prunebench.methods.base import Positions, SelectContext, Selection, Stage, register_method
from prunebench.methods.cls_signal import CLS_DEVIATIONS
from prunebench.methods.visionzip_ops import CONTEXTUAL_SHARE, visionzip_merge, visionzip_split


@register_method(
    "visionzip",
    stage=Stage.PRE_LLM,
    source="Yang et al. 2025 §3.2-3.3; dvlab-research/VisionZip visionzip/clip_encoder.py, utils.py, main.py",
    needs=("cls_attention", "cls_keys", "projector_input"),
    dtype="[CLS] row (no-[CLS] families: received attention) from the encoder layer's q/k in the model's dtype; "
    "q.k logits, softmax and head mean in float32 (stages/attention.py upcasts); key cosine and contextual "
    "merge in float32 (merged values cast back to the model's dtype)",
    rounding="k = round(keep*N) per image (n_keep_for, half up, >= 1); C = round(k*contextual_share) "
    "(half up; 10/64), D = k - C",
    positions=Positions.CONTIGUOUS,  # official: rebuilt sequence in prepare_inputs_labels_for_multimodal
    defaults={"contextual_share": CONTEXTUAL_SHARE, "vision_layer": None},
    deviations=(
        "[CLS] is not an output token: the official dominant set is [CLS] + (D-1) patches (visionzip(dominant=54) "
        "keeps 53 patches and the layer -2 [CLS] feature), but HF LLaVA has placeholders for the patches only; "
        "here all D dominant tokens are patches (the [CLS] slot goes to one more patch)",
        "budget split for any k: C = round-half-up(k * contextual_share), contextual_share = 10/64, D = k - C "
        "(reproduces 54+10, 108+20, 162+30; k=1 gives 1+0)",
        "token order: every output token sits at a patch slot in raster order (a contextual token at its target's "
        "slot); the official sequence is [CLS, dominant patches in raster order, contextual tokens in target order]",
        "[CLS] attention is the head-mean row (official: head-sum; same ranking)",
        "families whose projector input is not row-aligned with its output (Qwen2/2.5-VL merger; LLaVA-NeXT / "
        "OneVision, whose projector runs per view before unpadding and packing) merge after the projector, in LLM "
        "space, on the packed tokens (noted in the record)",
        "InternVL: merged on the pixel-shuffled projector input (a token = a 2x2 group's concatenated features)",
        "the record's merge groups (kept.merged_into: each token -> the contextual token it was assigned to) are "
        "gathered inside the method's timed span (one scatter of N ints)",
    ) + CLS_DEVIATIONS,
)
def visionzip(ctx: SelectContext, contextual_share: float = CONTEXTUAL_SHARE, vision_layer: int | None = None
              ) -> torch.Tensor | Selection:
    """[1, N, D] tokens + cls_attention [1, N] + cls_keys [1, N, d] -> Selection of k = D + C tokens."""
    if not isinstance(contextual_share, (int, float)) or not 0.0 <= contextual_share < 1.0:
        raise UserError(f"visionzip: contextual_share must be a fraction in [0, 1), got {contextual_share!r}")
    n = ctx.tokens.shape[1]
    if ctx.n_keep >= n:  # keep=1.0: the unpruned model
        return torch.arange(n, device=ctx.tokens.device)[None]
    n_dom, n_ctx = visionzip_split(ctx.n_keep, float(contextual_share))
    groups: list[torch.Tensor] = []
    index, tokens = visionzip_merge(ctx.tokens, ctx.signals["cls_attention"], ctx.signals["cls_keys"], n_dom, n_ctx,
                                    groups)
    return Selection(index=index, tokens=tokens, groups=groups[0])
