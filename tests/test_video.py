"""Video input: the built-in video set, per-frame budgets, and the record's frames x tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunebench import runner
from prunebench.data.shapes_video import build_shapes_video, sample_frames
from prunebench.errors import UserError
from prunebench.methods import resolve_method
from prunebench.methods.base import n_keep_for
from prunebench.record import load_record
from prunebench.stages import install


def test_uniform_sampling_and_answers():
    assert sample_frames(96, 64)[0] == 0 and sample_frames(96, 64)[-1] == 95 and len(sample_frames(96, 64)) == 64
    assert sample_frames(5, 8) == [0, 1, 2, 3, 4]
    videos = build_shapes_video(6, num_frames=8, image_size=48)
    assert videos == build_shapes_video(6, num_frames=8, image_size=48)  # deterministic
    for item in videos:
        assert len(item.frames) == 8 and item.image is item.frames[0]
        if item.category == "direction":
            first, last = (np.asarray(f).astype(int) for f in (item.frames[0], item.frames[-1]))
            bg = first[0, 0]
            cols = [np.nonzero((img[: 24] != bg).any(-1).any(0))[0].mean() for img in (first, last)]
            assert item.answer == ("right" if cols[1] > cols[0] else "left")


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    from conftest import load_tiny, tiny_checkpoint

    return load_tiny(tiny_checkpoint("llava_onevision", tmp_path_factory), family="llava_onevision")


def video_inputs(tiny, frames: int = 6):
    item = build_shapes_video(1, num_frames=frames, image_size=48)[0]
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": item.question}]}]
    prompt = tiny.processor.apply_chat_template(conv, add_generation_prompt=True)
    return tiny.processor(videos=[list(item.frames)], text=prompt, return_tensors="pt")


@pytest.mark.parametrize("name", ["random_pre", "divprune", "fastv", "random_intra"])
def test_video_keep_one_is_vanilla_and_budget_is_per_frame(onevision, name):
    inputs = video_inputs(onevision)
    with torch.no_grad():
        ref = onevision.model(**inputs).logits
        with install(onevision.seams, resolve_method(name), keep=1.0) as inst:
            assert torch.equal(onevision.model(**inputs).logits, ref)
        with install(onevision.seams, resolve_method(name), keep=0.34) as inst:
            onevision.model(**inputs)
    n_in = inst.counts.n_visual_in
    assert n_in == 6 * 9 + 1  # 6 frames of 3x3 pooled tokens + one newline
    if name.endswith("_pre") or name == "divprune":
        assert inst.counts.n_visual_out == 6 * 3 + 1 and inst.counts.n_fixed == 1  # round(0.34*9) = 3 per frame
    else:
        assert inst.counts.n_visual_out == round(0.34 * n_in)  # intra-LLM: one budget over the sequence


def test_video_job_records_frames_and_tokens(tmp_path, tmp_path_factory):
    from conftest import tiny_checkpoint
    from test_runner import config

    path = tiny_checkpoint("llava_onevision", tmp_path_factory)
    cfg = config(path, tmp_path, "model=tiny_onevision", "dataset=shapes_video", "dataset.num_frames=8",
                 "dataset.image_size=48", "method=random_pre", "keep=0.333")
    rec = load_record(runner.run(cfg, quiet=True))
    assert rec.n_failed == 0 and rec.tokens["n_frames"] == 8
    assert rec.tokens["per_frame_in"] == 9 and rec.tokens["per_frame_out"] == 3 and rec.tokens["n_visual_fixed"] == 1


def test_model_without_a_video_processor_refuses_videos(tmp_path, tmp_path_factory):
    from conftest import tiny_checkpoint
    from test_runner import config

    path = tiny_checkpoint("qwen2_5_vl", tmp_path_factory)
    cfg = config(path, tmp_path, "model=tiny_qwen25vl", "dataset=shapes_video", "dataset.num_frames=4",
                 "method=fastv")
    with pytest.raises(UserError, match="produced no pixels for videos"):
        runner.run(cfg, quiet=True)


def hooks_and_classes(model):
    return (sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
            [type(m) for m in model.modules()], sorted(vars(model.model)))


@pytest.mark.parametrize("name", ["evoprune", "tome"])
@pytest.mark.parametrize("keep", [0.34, 0.5])
def test_merges_inside_siglip_on_video_frames(onevision, keep, name):
    """Vision-stage merges on LLaVA-OneVision video: per-frame budget of the pooled count,
    keep=1.0 identical, patch undone, cached decode equal to a full recompute."""
    from test_contract import GEN, _uncached_greedy

    inputs = video_inputs(onevision)
    method = resolve_method(name)
    with torch.no_grad():
        reference = onevision.model.generate(**inputs, **GEN)
        onevision.model(**inputs)  # transformers installs its capture hooks lazily
        before = hooks_and_classes(onevision.model)
        with install(onevision.seams, method, keep=1.0) as inst:
            assert torch.equal(onevision.model.generate(**inputs, **GEN), reference) and sum(inst.schedule) == 0
        with install(onevision.seams, method, keep=keep) as inst:
            out = onevision.model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
            ids, logits = _uncached_greedy(onevision.model, inputs, GEN["max_new_tokens"], inst)
        per_frame = n_keep_for(keep, 9)[0]
        assert sum(inst.schedule) == 36 - per_frame
        assert inst.counts.n_visual_out == 6 * per_frame + 1 and inst.counts.n_fixed == 1
        assert torch.equal(out.sequences, ids)
        torch.testing.assert_close(torch.stack(out.logits, 1), logits, atol=1e-4, rtol=1e-4)
        assert hooks_and_classes(onevision.model) == before
        assert torch.equal(onevision.model.generate(**inputs, **GEN), reference)


def test_vision_stage_refuses_images_on_onevision(onevision):
    from conftest import Tiny

    image = Tiny.inputs(onevision)
    with install(onevision.seams, resolve_method("evoprune"), keep=0.5):
        with pytest.raises(RuntimeError, match="take videos only"):
            with torch.no_grad():
                onevision.model(**image)
