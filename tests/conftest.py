from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(1)

# Small enough to be fast, big enough to exercise everything: 6x6 = 36 visual tokens,
# 6 CLIP layers (5 feed layer -2), 4 Llama layers with GQA (4 heads, 2 kv heads).
TINY = dict(seed=0, image_size=48, patch_size=8, vision_layers=6, vision_hidden=32, vision_heads=2,
            text_layers=4, text_hidden=64, text_heads=4, text_kv_heads=2)


@dataclass
class Tiny:
    path: Path
    model: Any
    processor: Any
    seams: Any

    def inputs(self, question: str = "What color is the background? Answer with one word.", seed: int = 0):
        from prunebench.data.shapes import make_sample

        sample = make_sample(seed, image_size=48)
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(conv, add_generation_prompt=True)
        return self.processor(images=sample.image, text=prompt, return_tensors="pt")


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prunebench.models.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "tiny_llava", **TINY)


def load_tiny(path: Path, attn: str = "sdpa") -> Tiny:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from prunebench.models.llava import llava_seams

    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn).eval()
    return Tiny(path, model, AutoProcessor.from_pretrained(path), llava_seams(model))


@pytest.fixture(scope="session")
def tiny(tiny_path: Path) -> Tiny:
    return load_tiny(tiny_path)
