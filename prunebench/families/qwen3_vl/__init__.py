"""Qwen3-VL adapter (`Qwen3VLForConditionalGeneration`, transformers `models/qwen3_vl/modeling_qwen3_vl.py`;
`Qwen/Qwen3-VL-8B-Instruct`, `-4B-`, `-2B-`).

Its visual tokens are born as in Qwen2.5-VL (the ViT's `pooler_output`, 2x2 patch merger, one budget per image and
per temporal slice, 3-D M-RoPE with the original ids kept), with three differences this room declares:
- the ViT has full attention in every block (no windows), 16 px patches (32 px per LLM token) and a learned
  position table resampled per image; the Qwen vision driver and signal reader run on it unchanged;
- the decoder is Qwen3: each head of q and k is RMS-normalised (`q_norm` / `k_norm`) before RoPE, so the
  attention rows recomputed from captured q/k are read after those norms (`DecoderAccess(qk_norm=True)`);
- DeepStack: the ViT blocks `deepstack_visual_indexes` feed mergers whose outputs are added to the visual rows of
  the hidden states after decoder layers 0 .. n-1 (`deepstack.py`); a pruned token leaves every level.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from prunebench.families import Family, hf_class, lazy
from prunebench.families.qwen import INPUT_KNOB
from prunebench.seams import DecoderAccess, Seams


def qwen3_vl_seams(model: nn.Module) -> Seams:
    from prunebench.families.qwen import qwen_vl_seams  # its seams carry the pixel knob
    from prunebench.families.qwen3_vl.deepstack import DeepStack

    deepstack = DeepStack(model.model.visual) if model.config.vision_config.deepstack_visual_indexes else None
    return dataclasses.replace(qwen_vl_seams(model), decoder=DecoderAccess(qk_norm=True), deepstack=deepstack)


FAMILY_ENTRIES = (
    Family("qwen3_vl", hf_class("Qwen3VLForConditionalGeneration"), qwen3_vl_seams,
           lazy("prunebench.fixtures.tiny_qwen3vl:qwen3_vl_local_processor"),
           lazy("prunebench.families.processors:load_qwen_processor"),  # torchvision-free
           tiny="prunebench.fixtures.tiny_qwen3vl:build_tiny_qwen3_vl", tiny_image_side=128,
           input_knob=INPUT_KNOB),
)
