"""EvoPrune inside the Qwen2.5-VL / Qwen2-VL ViT on 2x2 merge units (`families/qwen/vision.py`): the
per-image schedules are what runs, the attention segments (full image / window) and rotary rows follow
the surviving units, units stay whole, and the counts reach the LLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.vision_utils import get_vision_position_ids

from prunebench.errors import UserError
from prunebench.families.qwen.vision import UnitState, merge_units
from prunebench.methods import resolve_method
from prunebench.methods.base import n_keep_for
from prunebench.methods.evoprune_ops import evoprune_merge
from prunebench.methods.merge_ops import layer_schedule
from prunebench.stages import install

SIZES = [(168, 112), (140, 84)]  # (w, h) -> 6x4 = 24 and 5x3 = 15 merge units (odd: padded windows)
# at 28 px per merge unit (Qwen2.x); Qwen3-VL's 32 px units get the same unit grids from `_scaled`


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def qwen(request, tmp_path_factory):
    from conftest import load_tiny, tiny_checkpoint

    return load_tiny(tiny_checkpoint(request.param, tmp_path_factory), family=request.param)


def image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _scaled(qwen, sizes):
    """Sizes given at 28 px per merge unit -> the same unit grids at this processor's unit size."""
    unit = qwen.processor.image_processor.patch_size * qwen.processor.image_processor.merge_size
    return [(w * unit // 28, h * unit // 28) for w, h in sizes]


def prompt_inputs(qwen, sizes=SIZES):
    sizes = _scaled(qwen, sizes)
    conv = [{"role": "user", "content": [{"type": "image"} for _ in sizes] + [{"type": "text", "text": "Colors?"}]}]
    prompt = qwen.processor.apply_chat_template(conv, add_generation_prompt=True)
    return qwen.processor(images=[image(i, w, h) for i, (w, h) in enumerate(sizes)], text=prompt, return_tensors="pt")


def pixels(qwen, sizes):
    sizes = _scaled(qwen, sizes)
    out = qwen.processor.image_processor(images=[image(i, w, h) for i, (w, h) in enumerate(sizes)], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def watch_blocks(qwen) -> tuple[list[dict], list]:
    """Rows and kwargs entering each ViT block (registered after the installation's own pre-hooks)."""
    seen: list[dict] = []

    def pre(i):
        def hook(module, args, kwargs):
            cos, _ = kwargs["position_embeddings"]
            seen.append({"block": i, "rows": args[0].shape[0], "cu": kwargs["cu_seqlens"].tolist(),
                         "max": kwargs.get("max_seqlen"), "cos": cos.clone()})

        return hook

    return seen, [b.register_forward_pre_hook(pre(i), with_kwargs=True)
                  for i, b in enumerate(qwen.model.model.visual.blocks)]


def windowed(qwen) -> set[int]:
    """Blocks with window attention (Qwen2.5-VL's non-full blocks)."""
    full = getattr(qwen.model.model.visual, "fullatt_block_indexes", None)
    return set() if full is None else set(range(len(qwen.model.model.visual.blocks))) - set(full)


@pytest.mark.parametrize("schedule", ["skip", "mean", "first[2]", "last[2]", "decreasing[1]"])
def test_units_entering_each_block_follow_each_images_schedule(qwen, schedule):
    inputs = prompt_inputs(qwen)
    units = [24, 15]
    n_blocks = len(qwen.model.model.visual.blocks)
    with install(qwen.seams, resolve_method("evoprune", {"schedule": schedule}), keep=0.3, seed=0) as inst:
        seen, handles = watch_blocks(qwen)
        try:
            with torch.no_grad():
                qwen.model(**inputs)
        finally:
            for h in handles:
                h.remove()
    keeps = [n_keep_for(0.3, n)[0] for n in units]
    expected = [layer_schedule(schedule, n_blocks, n, n - k) for n, k in zip(units, keeps, strict=True)]
    st: UnitState = inst.state.vision
    assert st.schedules == expected
    assert inst.schedule == [sum(s[i] for s in expected) for i in range(n_blocks)]
    for entry in seen:
        i = entry["block"]
        left = [n - sum(s[:i]) for n, s in zip(units, expected, strict=True)]  # units per image entering block i
        assert entry["rows"] == 4 * sum(left) == entry["cos"].shape[0] == entry["cu"][-1]
        lengths = np.diff(entry["cu"])
        assert (lengths > 0).all() and (lengths % 4 == 0).all()
        if i in windowed(qwen):  # windows nest in images and never grow (tiny: 2x2-unit windows)
            assert 4 * left[0] in entry["cu"] and (lengths <= 16).all()
        else:  # full attention: one segment per image, exactly its surviving units
            assert entry["cu"] == [0, 4 * left[0], 4 * sum(left)]
    assert inst.counts.n_visual_in == sum(units) and inst.counts.n_visual_out == sum(keeps) == 7 + 5
    assert st.size.sum() == sum(units) and [int((st.part == p).sum()) for p in (0, 1)] == keeps


def test_two_images_match_each_image_alone(qwen):
    """Per-image budgets and attention segments: merging in a two-image tower call decides and computes
    exactly what each image alone gives (wrong cu_seqlens would mix the images' attention)."""
    visual = qwen.model.model.visual
    method = resolve_method("evoprune")
    both, grid = pixels(qwen, SIZES)
    n_rows = [int(g.prod()) for g in grid]
    results = []
    with install(qwen.seams, method, keep=0.3, seed=0) as inst, torch.no_grad():
        out = visual(both, grid_thw=grid).pooler_output
        results.append((out, inst.state.visual_sizes, inst.state.visual_keep))
        for px, g in zip(both.split(n_rows), grid, strict=True):
            out = visual(px, grid_thw=g[None]).pooler_output
            results.append((out, inst.state.visual_sizes, inst.state.visual_keep))
    (out, sizes, keep), *alone = results
    assert sizes == [24, 15] and [s[0] for _, s, _ in alone] == sizes
    for p, (o, _, k) in enumerate(alone):
        assert torch.equal(keep[p], k[0])
        torch.testing.assert_close(out.split(sizes)[p], o, atol=1e-5, rtol=1e-5)
        dropped = torch.ones(sizes[p], dtype=torch.bool)
        dropped[k[0]] = False
        assert (o[dropped] == 0).all() and (o[~dropped] != 0).any(-1).all()  # merged-away units: zeros


def test_video_slices_are_budget_parts_like_images(qwen):
    """A video's temporal slices are merged apart, each with its own budget, as two images would be,
    and a caller's precomputed max_seqlen / max_window_seqlen (the Flash path) follows the merges."""
    visual = qwen.model.model.visual
    px, grid = pixels(qwen, [(112, 112), (112, 112)])
    video = torch.tensor([[2, *grid[0, 1:].tolist()]])
    extra = {"max_seqlen": 64}
    if windowed(qwen):
        extra["max_window_seqlen"] = 16
    outs = []
    with install(qwen.seams, resolve_method("evoprune"), keep=0.25, seed=0) as inst, torch.no_grad():
        for g in (grid, video):
            seen, handles = watch_blocks(qwen)
            try:
                outs.append((visual(px, grid_thw=g, **extra).pooler_output, list(inst.state.visual_keep), seen))
            finally:
                for h in handles:
                    h.remove()
    (a, keep_a, seen_a), (b, keep_b, seen_b) = outs
    assert inst.state.visual_sizes == [16, 16] and all(k.numel() == 4 for k in keep_b)
    assert all(torch.equal(x, y) for x, y in zip(keep_a, keep_b, strict=True))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for entry in seen_b:
        assert entry["max"] == max(np.diff(entry["cu"]))


def test_merged_units_stay_whole_with_their_representatives_rotary_rows(qwen):
    """Every surviving unit is 4 consecutive rows carrying the rotary angles of its representative's
    2x2 patches (the rows of b, in raster terms), in the ViT's window order."""
    visual = qwen.model.model.visual
    px, grid = pixels(qwen, SIZES)
    with install(qwen.seams, resolve_method("evoprune", {"schedule": "first[3]"}), keep=0.4, seed=0) as inst:
        seen, handles = watch_blocks(qwen)
        try:
            with torch.no_grad():
                visual(px, grid_thw=grid)
        finally:
            for h in handles:
                h.remove()
    st: UnitState = inst.state.vision
    cos, _ = visual.rotary_pos_emb(px, get_vision_position_ids(grid, visual.spatial_merge_size))  # raster rows
    starts = torch.tensor([0, 24])
    raster = starts[st.part] + st.rep  # global raster index of each surviving unit, sequence order
    expected = cos.view(-1, 4, cos.shape[-1])[raster].flatten(0, 1)
    assert torch.equal(seen[-1]["cos"], expected)
    for p in (0, 1):  # representatives are distinct and sizes account for every unit
        reps = st.rep[st.part == p]
        assert reps.unique().numel() == reps.numel()
        assert st.size[st.part == p].sum() == st.n_units[p]


def test_merge_units_is_the_decision_applied_row_by_row():
    torch.manual_seed(0)
    units, size = torch.randn(10, 4, 8), torch.tensor([1.0, 2, 1, 3, 1, 1, 2, 1, 1, 1])
    pos = torch.arange(10)
    out = evoprune_merge(units.mean(1)[None], size[None], pos[None], torch.rand(1, 10), 3)
    merged, o2n = out.merged[0], out.old_to_new[0]
    rows = merge_units(units, size, o2n, merged)
    assert rows.shape == (7, 4, 8)
    torch.testing.assert_close(rows.mean(1), out.x[0])  # the unit means are what the decision merged
    for new in range(7):
        src = (o2n == new).nonzero()[:, 0]
        want = (units[src] * size[src, None, None]).sum(0) / size[src].sum()
        if src.numel() == 1:
            assert torch.equal(rows[new], units[src[0]])  # untouched units are exact
        else:
            torch.testing.assert_close(rows[new], want)


def test_keep_one_installs_nothing_in_the_vit(qwen):
    visual = qwen.model.model.visual

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in visual.modules())

    before, classes = hooks(), [type(m) for m in visual.modules()]
    with install(qwen.seams, resolve_method("evoprune"), keep=1.0) as inst:
        assert hooks() == before and [type(m) for m in visual.modules()] == classes
        assert inst.schedule == [0] * len(visual.blocks)
    with install(qwen.seams, resolve_method("evoprune"), keep=0.5):
        assert hooks() > before and [type(m) for m in visual.modules()] != classes
    assert hooks() == before and [type(m) for m in visual.modules()] == classes


def test_unreachable_keep_is_a_user_error(qwen):
    """4 ViT blocks halve 24 units to at least 2: keep=0.01 (1 unit) cannot be reached."""
    inputs = prompt_inputs(qwen)
    with install(qwen.seams, resolve_method("evoprune"), keep=0.01), torch.no_grad():
        with pytest.raises(UserError, match="at most 22"):
            qwen.model(**inputs)
    assert not any(hasattr(b, "_pb_merge") for b in qwen.model.model.visual.blocks)


def test_llm_sees_the_representatives_at_their_original_positions(qwen):
    inputs = prompt_inputs(qwen)
    with install(qwen.seams, resolve_method("evoprune"), keep=0.3, seed=0) as inst, torch.no_grad():
        qwen.model(**inputs)
    image_rows = (inputs["input_ids"][0] == qwen.model.config.image_token_id).nonzero()[:, 0]
    keep = inst.state.vision
    reps = [keep.rep[keep.part == p].sort().values for p in (0, 1)]
    want = torch.cat([image_rows[:24][reps[0]], image_rows[24:][reps[1]]])
    kept = inst.state.entry.index[0]
    assert torch.equal(kept[torch.isin(kept, image_rows)], want)


def test_merge_point_layer(qwen):
    inputs = prompt_inputs(qwen)
    logits = {}
    for point in ("attention", "layer"):
        with install(qwen.seams, resolve_method("evoprune", {"merge_point": point}), keep=0.3, seed=0) as inst:
            with torch.no_grad():
                logits[point] = qwen.model(**inputs).logits[:, -1]
        assert inst.counts.n_visual_out == 12
    assert not torch.equal(logits["attention"], logits["layer"])
    assert not any(hasattr(b, "_pb_merge") for b in qwen.model.model.visual.blocks)


def test_unit_importance_is_eager_attention_received_within_each_segment(qwen):
    """The importance handed to the merge = eager softmax(q k^T) column means inside each attention
    segment of the block (window or image), rotary applied, averaged over each unit's 4 rows."""
    import dataclasses
    import sys

    visual = qwen.model.model.visual
    evo = resolve_method("evoprune", {"schedule": "mean"})
    given: list[torch.Tensor] = []

    def spy(x, size, rep, importance, r, **params):
        given.append(importance[0])
        return evo.spec.merge(x, size, rep, importance, r, **params)

    spied = dataclasses.replace(evo, spec=dataclasses.replace(evo.spec, merge=spy))
    px, grid = pixels(qwen, [(112, 112)])
    entered: list[tuple] = []
    with install(qwen.seams, spied, keep=0.25, seed=0) as inst, torch.no_grad():
        handles = [b.register_forward_pre_hook(lambda m, a, k: entered.append((m, a[0], dict(k))), with_kwargs=True)
                   for b in visual.blocks]
        try:
            visual(px, grid_thw=grid)
        finally:
            for h in handles:
                h.remove()
        assert inst.schedule == [3, 3, 3, 3] and len(given) == 4
        for (block, x, kwargs), importance in zip(entered, given, strict=True):
            attn = block.attn
            q, k, _ = attn.qkv(block.norm1(x)).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3)
            q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, *kwargs["position_embeddings"])
            rows = []
            cu = kwargs["cu_seqlens"].tolist()
            for a, b in zip(cu[:-1], cu[1:], strict=True):
                probs = torch.softmax(torch.einsum("thd,shd->hts", q[a:b], k[a:b]) * attn.scaling, dim=-1)
                rows.append(probs.mean(dim=(0, 1)))
            torch.testing.assert_close(importance, torch.cat(rows).view(-1, 4).mean(1), atol=1e-6, rtol=1e-5)
