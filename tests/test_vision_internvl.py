"""Vision-stage merges inside InternViT: units are the model's own pixel-shuffle groups, units stay
whole, per-tile budgets, layer counts follow the schedule."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from prunebench.families.internvl.vision import shuffle_groups
from prunebench.methods import resolve_method
from prunebench.methods.base import n_keep_for
from prunebench.stages import install


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    from conftest import load_tiny, tiny_checkpoint

    return load_tiny(tiny_checkpoint("internvl", tmp_path_factory), family="internvl")


def test_units_are_2x2_blocks_of_the_patch_grid(internvl):
    side = 8  # 64 px tiles, 8 px patches
    groups = shuffle_groups(internvl.model.model, side)
    assert groups.shape == (16, 4) and sorted(groups.flatten().tolist()) == list(range(64))
    rows, cols = groups // side, groups % side
    assert ((rows.max(1).values - rows.min(1).values) == 1).all()
    assert ((cols.max(1).values - cols.min(1).values) == 1).all()


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_multi_tile_image_keeps_the_budget_of_every_tile(internvl, keep):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = internvl.processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = internvl.processor(images=Image.new("RGB", (128, 64), (30, 90, 200)), text=prompt, return_tensors="pt")
    tiles = inputs["pixel_values"].shape[0]
    assert tiles == 3
    seen: list[int] = []
    layers = internvl.model.model.vision_tower.encoder.layer
    hooks = [layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for layer in layers]
    try:
        with install(internvl.seams, resolve_method("evoprune"), keep=keep) as inst, torch.no_grad():
            internvl.model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    per_tile = n_keep_for(keep, 16)[0]
    assert inst.counts.n_visual_in == tiles * 16 and inst.counts.n_visual_out == tiles * per_tile
    r = inst.schedule
    assert seen == [1 + 4 * (16 - sum(r[:i])) for i in range(len(layers))]
