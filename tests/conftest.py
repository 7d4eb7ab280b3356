from __future__ import annotations

import importlib
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

# Builder kwargs the tests use instead of a family's defaults (the families and their builders: the registry).
BUILD_KWARGS: dict[str, dict[str, Any]] = {"llava": TINY}


def family_names() -> list[str]:
    from prunebench.families import FAMILIES

    return FAMILIES.names()


def _builder(family: str):
    from prunebench.families import FAMILIES

    target = FAMILIES.get(family).tiny
    if target is None:
        pytest.skip(f"no tiny builder for {family}")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name), BUILD_KWARGS.get(family, {"seed": 0})


@dataclass
class Tiny:
    family: str
    path: Path
    model: Any
    processor: Any
    seams: Any
    image_side: int

    def inputs(self, question: str = "What color is the background? Answer with one word.", seed: int = 0,
               batch: int = 1):
        """One prompt with one image; batch > 1: that sample repeated in every row of a batch."""
        from prunebench.data.shapes import make_sample

        image = make_sample(seed, image_size=self.image_side).image
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(conv, add_generation_prompt=True)
        if batch > 1:
            return self.processor(images=[image] * batch, text=[prompt] * batch, return_tensors="pt",
                                  padding=True, padding_side="left")
        return self.processor(images=image, text=prompt, return_tensors="pt")

    def n_visual(self, inputs) -> int:
        ids = torch.tensor(self.seams.image_token_ids)
        return int(torch.isin(inputs["input_ids"][0], ids).sum())


def load_tiny(path: Path, attn: str = "sdpa", family: str = "llava") -> Tiny:
    from transformers import AutoProcessor

    from prunebench.families import FAMILIES

    fam = FAMILIES.get(family)
    model = fam.model_class().from_pretrained(path, attn_implementation=attn).eval()
    processor = (fam.load_processor or AutoProcessor.from_pretrained)(path)
    return Tiny(family, path, model, processor, fam.seams(model), fam.tiny_image_side)


_PATHS: dict[str, Path] = {}


def tiny_checkpoint(family: str, factory: pytest.TempPathFactory) -> Path:
    if family not in _PATHS:
        build, kwargs = _builder(family)
        _PATHS[family] = build(factory.mktemp(family) / family, **kwargs)
    return _PATHS[family]


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint("llava", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny(tiny_path: Path) -> Tiny:
    return load_tiny(tiny_path)


@pytest.fixture(scope="session", params=family_names())
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def fam_path(family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(family, tmp_path_factory)


@pytest.fixture(scope="session")
def fam(family: str, fam_path: Path) -> Tiny:
    """The tiny checkpoint of each family, loaded once per session."""
    return load_tiny(fam_path, family=family)


def llm_input(tiny, inputs, method=None, keep: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """inputs_embeds and position_ids as the first decoder layer receives them (after the entry hook)."""
    seen: dict[str, torch.Tensor] = {}

    def spy(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].clone()
        pos = kwargs.get("position_ids")
        seen["pos"] = torch.arange(seen["embeds"].shape[1])[None] if pos is None else pos.clone()

    def run():
        handle = tiny.seams.language_model.register_forward_pre_hook(spy, with_kwargs=True)
        try:
            with torch.no_grad():
                tiny.model(**inputs)
        finally:
            handle.remove()

    if method is None:
        run()
    else:
        from prunebench.stages import install

        with install(tiny.seams, method, keep=keep, seed=seed):
            run()
    return seen
