"""What the [CLS]-attention methods share: the deviations every one of them states (their
`vision_layer` parameter is resolved against the encoder in stages/vision_signals.py)."""

from __future__ import annotations

CLS_DEVIATIONS = (
    "[CLS] attention recomputed from the encoder layer's own q/k (SDPA stays on) instead of output_attentions "
    "(eager); the same numbers in fp32 (tests/test_cls_methods.py checks it against eager attention); the logits "
    "are taken in fp32 where eager attention takes them in the model's dtype, so under fp16/bf16 the values differ "
    "in the last bits and a near-tie can rank otherwise",
    "InternVL: a visual token is a 2x2 pixel-shuffle group of InternViT patches; its [CLS] attention is the mean "
    "over the group's 4 patches",
    "Qwen2.5-VL / Qwen2-VL have no [CLS]: substitute = mean attention each patch RECEIVES at that ViT block "
    "(over queries and heads, within the block's attention segment: window or whole image), averaged per 2x2 "
    "merge unit (METHODS.md §0.4, as EffiVLM-VisionZip / HoloV-Qwen)",
    "vision_layer=null reads the layer whose output the family selects (LLaVA-1.5: CLIP layer L-2, the official "
    "attentions[-2]; InternVL / Qwen: the last layer)",
    "LLaVA-NeXT / LLaVA-OneVision: each view's (base image, crops) patch signals are packed onto the image's LLM "
    "tokens by the model's own pack_image_features (videos: its own bilinear apply_pooling per frame, so a pooled "
    "token gets the bilinear mean of its source patches' signals); OneVision's SigLIP has no [CLS]: the "
    "received-attention substitute per view (as for Qwen)",
    "LLaVA-NeXT / LLaVA-OneVision budget: k = round(keep * candidates) per packed image (base view + unpadded crops, "
    "row newlines always kept and outside the budget), per frame for videos; the official LLaVA-NeXT budgets are "
    "per crop (FasterVLM / VisPruner: k per view, VisionZip 27+5 per view)",
)

