"""The kept tokens stored with each prediction row (`prunebench/kept.py`): per family, the stored runs decode to
the row's n_visual_out and to the visual tokens the installation really kept; the layout covers them."""

from __future__ import annotations

import pytest
import torch

from prunebench.errors import UserError
from prunebench.generation import generate_batch_timed
from prunebench.kept import from_runs, locate, to_runs, unit_tokens
from prunebench.methods import resolve_method
from prunebench.models.loader import LoadedModel
from prunebench.stages import install
from prunebench.timing import NullTimer

# a pre-LLM select, a single-layer intra-LLM select, multi-layer ones (SparseVLM inserts tokens), a vision merge
METHODS = ["random_pre", "fastv", "pdrop", "sparsevlm", "tome"]


def loaded_of(fam) -> LoadedModel:
    return LoadedModel(name=fam.family, model=fam.model, processor=fam.processor, seams=fam.seams,
                       device=torch.device("cpu"), dtype=torch.float32, weights="random", source="tiny",
                       untrained=True)


def run_rows(fam, name: str, keep: float, batch: int = 1):
    inputs = fam.inputs(batch=batch)
    try:
        with install(fam.seams, resolve_method(name), keep=keep, seed=0) as inst:
            rows = generate_batch_timed(loaded_of(fam), inputs, inst, NullTimer(), [0] * batch, 3)
            state = inst.state
    except UserError as err:
        pytest.skip(f"{name} on {fam.family}: {err}")
    return inputs, rows, state


def truly_kept(fam, inputs, state, row: int = 0) -> list[int]:
    """The llm_visual indices the installation kept, read off its compactions (entry, then the last intra one)."""
    visual = torch.isin(inputs["input_ids"][row], torch.tensor(fam.seams.image_token_ids)).nonzero()[:, 0]
    seq = torch.arange(inputs["input_ids"].shape[1])
    if state.entry is not None:
        seq = state.entry.index[row]
    rows = seq
    if state.intra is not None:
        local = state.intra.index[row]
        if state.intra.inserted is not None:
            local = local[~state.intra.inserted[row]]
        rows = seq[local]
    rows = rows[torch.isin(rows, visual)]
    return torch.searchsorted(visual, rows).tolist()


def test_runs_round_trip() -> None:
    index = [0, 1, 2, 5, 7, 8, 20]
    assert to_runs(index) == [0, 3, 5, 1, 7, 2, 20, 1]
    assert from_runs(to_runs(index)) == index
    assert to_runs([]) == [] and from_runs([]) == []


@pytest.mark.parametrize("name", METHODS)
def test_kept_decodes_to_the_count_and_the_kept_tokens(fam, name):
    inputs, rows, state = run_rows(fam, name, keep=0.25)
    row = rows[0]
    kept = row["kept"]
    index = from_runs(kept["index"])
    assert kept["space"] == "llm_visual" and kept["n"] == row["n_visual_in"]
    assert len(index) + kept.get("inserted", 0) == row["n_visual_out"] == kept["k"] + kept.get("inserted", 0)
    assert index == sorted(set(index)) and all(0 <= i < kept["n"] for i in index)
    assert index == truly_kept(fam, inputs, state)
    assert len(index) < kept["n"]  # something was dropped at keep=0.25
    layout = kept["layout"]
    assert sum(unit_tokens(u) for u in layout) == kept["n"]
    assert [u["start"] for u in layout] == [sum(unit_tokens(v) for v in layout[:k]) for k in range(len(layout))]
    for i in index:  # every kept index lands in a unit
        locate(layout, i)


def test_kept_per_row_of_a_batch(fam):
    inputs, rows, state = run_rows(fam, "random_pre", keep=0.25, batch=2)
    for r, row in enumerate(rows):
        assert from_runs(row["kept"]["index"]) == truly_kept(fam, inputs, state, r)
        assert row["kept"]["k"] == row["n_visual_out"]


def test_vanilla_and_keep_one_rows_have_no_kept_field(tiny):
    for name, keep in (("vanilla", 1.0), ("random_pre", 1.0)):
        _, rows, _ = run_rows(tiny, name, keep)
        assert "kept" not in rows[0]


def test_vision_merge_groups_point_at_kept_tokens(tiny):
    _, rows, _ = run_rows(tiny, "tome", keep=0.25)
    kept = rows[0]["kept"]
    index = from_runs(kept["index"])
    into = kept["merged_into"]
    assert len(into) == kept["n"] - len(index)
    assert set(into) <= set(index)


def test_pooling_groups_are_the_windows_of_the_pooled_tokens(tiny):
    """pooling_pre at keep 0.25 on the 6 x 6 grid pools 2 x 2 windows: each dropped patch is merged into the
    kept (centre) token of its own window."""
    _, rows, _ = run_rows(tiny, "pooling_pre", keep=0.25)
    kept = rows[0]["kept"]
    index = from_runs(kept["index"])
    dropped = sorted(set(range(kept["n"])) - set(index))
    assert len(kept["merged_into"]) == len(dropped) and len(index) == 9
    centre = {(r // 2, c // 2): r * 6 + c for r, c in (divmod(i, 6) for i in index)}
    for i, into in zip(dropped, kept["merged_into"], strict=True):
        r, c = divmod(i, 6)
        assert into == centre[(r // 2, c // 2)], i


@pytest.mark.parametrize("family_name", ["llava", "internvl"])
def test_visionzip_groups_are_its_contextual_assignment(tiny, fam, family_name):
    """VisionZip on a family: every dropped token was merged into a kept (contextual) token."""
    if fam.family != family_name:
        pytest.skip("one family per case")
    _, rows, _ = run_rows(fam, "visionzip", keep=0.25)
    kept = rows[0]["kept"]
    index = from_runs(kept["index"])
    into = kept["merged_into"]
    assert len(into) == kept["n"] - len(index) and set(into) <= set(index) and -1 not in into


def test_a_pruning_method_without_groups_has_no_merged_into(tiny):
    _, rows, _ = run_rows(tiny, "random_pre", keep=0.25)
    assert "merged_into" not in rows[0]["kept"]


def test_layout_shapes_per_family(fam):
    _, rows, _ = run_rows(fam, "random_pre", keep=0.5)
    layout = rows[0]["kept"]["layout"]
    kinds = [u["kind"] for u in layout]
    if fam.family == "llava":
        assert kinds == ["image"] and layout[0]["grid"] == [6, 6]
    elif fam.family in ("llava_next", "llava_onevision"):
        assert kinds in (["base", "views"], ["image", "newline"])
        if kinds == ["base", "views"]:
            assert layout[1]["newline"] is True
    elif fam.family == "internvl":
        assert set(kinds) == {"tile"} and [u["tile"] for u in layout] == list(range(len(layout)))
    else:  # Qwen: the real grid of grid_thw, in 2x2 merge units
        t, h, w = inputs_grid(fam)
        assert kinds == ["image"] and layout[0]["grid"] == [h // 2, w // 2]


def inputs_grid(fam) -> list[int]:
    return fam.inputs()["image_grid_thw"][0].tolist()


@pytest.mark.parametrize("name", ["random_pre", "fastv", "tome"])
def test_video_frames_layout_and_kept(tmp_path_factory, name):
    """LLaVA-OneVision video: one unit per frame (3x3 pooled), then the closing newline; per-frame budgets."""
    from conftest import load_tiny, tiny_checkpoint
    from test_video import video_inputs

    fam = load_tiny(tiny_checkpoint("llava_onevision", tmp_path_factory), family="llava_onevision")
    inputs = video_inputs(fam)
    with install(fam.seams, resolve_method(name), keep=0.34, seed=0) as inst:
        row = generate_batch_timed(loaded_of(fam), inputs, inst, NullTimer(), [0], 3)[0]
        expected = truly_kept(fam, inputs, inst.state)
    kept = row["kept"]
    index = from_runs(kept["index"])
    assert index == expected and len(index) == row["n_visual_out"]
    layout = kept["layout"]
    assert [u["kind"] for u in layout] == ["frame"] * 6 + ["newline"]
    assert [u["frame"] for u in layout[:-1]] == list(range(6)) and layout[0]["grid"] == [3, 3]
    if name != "fastv":  # the closing newline kept outside the budget; round(0.34 * 9) = 3 in every frame
        assert index[-1] == 54 and locate(layout, 54) == (6, None, None)
        frames = [locate(layout, i)[0] for i in index[:-1]]
        assert [frames.count(f) for f in range(6)] == [3] * 6


def test_visionzip_merge_groups_follow_its_assignment():
    """The groups visionzip_merge reports: dominant and target tokens hold their own slot, every other token its
    most cosine-similar target's (by keys), and the slots held are exactly the output index."""
    import torch.nn.functional as F

    from prunebench.methods.visionzip_ops import contextual_targets, visionzip_merge

    g = torch.Generator().manual_seed(0)
    n, d, n_dom, n_ctx = 40, 8, 6, 4
    x, attn, keys = torch.randn(1, n, d, generator=g), torch.rand(1, n, generator=g), torch.randn(1, n, 5, generator=g)
    groups: list[torch.Tensor] = []
    index, _ = visionzip_merge(x, attn, keys, n_dom, n_ctx, groups)
    slot = groups[0][0]
    dominant = set(attn[0].topk(n_dom).indices.tolist())
    rest = [i for i in range(n) if i not in dominant]
    targets = [rest[j] for j in contextual_targets(len(rest), n_ctx).tolist()]
    unit = F.normalize(keys[0], dim=-1)
    for i in range(n):
        if i in dominant or i in targets:
            assert slot[i] == i
        else:
            assert slot[i] == targets[int((unit[targets] @ unit[i]).argmax())], i
    assert sorted(set(slot.tolist())) == index[0].tolist()


VISION_MERGES = ["tome", "evoprune"]


def spied(name: str, params: dict | None = None):
    """The method with its merge step recording each call's (rep it was given, result)."""
    import dataclasses

    method = resolve_method(name, params)
    calls: list[tuple[torch.Tensor, object]] = []

    def merge(x, size, rep, *args, **kwargs):
        out = method.spec.merge(x, size, rep, *args, **kwargs)
        calls.append((rep.clone(), out))
        return out

    return dataclasses.replace(method, spec=dataclasses.replace(method.spec, merge=merge)), calls


def run_spied(fam, name: str, keep: float, params: dict | None = None):
    if fam.family == "llava_onevision":
        pytest.skip("vision-stage merges on llava_onevision take videos only")
    method, calls = spied(name, params)
    inputs = fam.inputs()
    try:
        with install(fam.seams, method, keep=keep, seed=0) as inst:
            row = generate_batch_timed(loaded_of(fam), inputs, inst, NullTimer(), [0], 3)[0]
    except UserError as err:
        pytest.skip(f"{name} on {fam.family}: {err}")
    return inputs, row, calls


def identities(fam, inputs, n: int) -> torch.Tensor:
    """[rows a merge call saw, tokens] -> the llm_visual index of each token a first merge step is given (-1: [CLS],
    or a patch that does not reach the LLM), in the family's own token order (independent of `kept.py`)."""
    if fam.family == "llava":
        return torch.arange(-1, n)[None]
    if fam.family == "internvl":  # one row per tile; unit u of a tile is its LLM token u
        tiles = inputs["pixel_values"].shape[0]
        return torch.arange(n).view(tiles, -1)
    if fam.family == "llava_next":  # one row per view; where the model's packing puts each patch
        inner = fam.model.model
        views = inputs["pixel_values"].shape[1]
        side = inner.config.vision_config.image_size // inner.config.vision_config.patch_size
        ids = torch.arange(views * side * side, dtype=torch.float32).view(views, side * side, 1)
        packed, _ = type(inner).pack_image_features(inner, [ids], inputs["image_sizes"],
                                                    inner.config.vision_feature_select_strategy,
                                                    image_newline=torch.full((1,), -1.0))
        packed = packed[0][:, 0].round().long()
        out = torch.full((views * side * side,), -1)
        out[packed[packed >= 0]] = (packed >= 0).nonzero()[:, 0]
        return torch.cat([torch.full((views, 1), -1), out.view(views, -1)], dim=1)[:, 1 - fam.seams.vision_prefix:]
    # Qwen: one call per part on its units in the ViT's (window) order; the rep given is that sequence position
    from transformers.vision_utils import get_vision_window_index

    visual = fam.seams.vision_tower
    grid = inputs["image_grid_thw"]
    if getattr(visual, "fullatt_block_indexes", None) is None:
        return torch.arange(n)[None]
    index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                       window_size=visual.window_size, patch_size=visual.patch_size, kwargs={})
    return index[None]


@pytest.mark.parametrize("name", VISION_MERGES)
def test_vision_merge_groups_per_family(fam, name):
    """ToMe / EvoPrune on every family that merges images in the encoder: one group target per dropped token,
    each a kept token; with one merge step (all at the first layer) exactly the step's old_to_new, carried to
    llm_visual by the family's own token order."""
    inputs, row, calls = run_spied(fam, name, keep=0.25)
    kept = row["kept"]
    index = from_runs(kept["index"])
    into = kept["merged_into"]
    assert len(into) == kept["n"] - kept["k"]
    assert set(into) - {-1} <= set(index)
    if fam.family != "llava_next":  # there a patch may merge into one that unpadding cuts off (-1)
        assert -1 not in into
        # over several steps: each kept token's final ToMe size is the size of its group
        ident, (_, last) = identities(fam, inputs, kept["n"]), calls[-1]
        for seq, size in zip(ident, last.size, strict=True):
            alive = [i for i in seq.tolist() if i == -1 or i in index]  # the last step's survivors, in order
            assert [1 + into.count(i) for i in alive if i >= 0] == [int(s) for i, s in zip(alive, size.tolist(), strict=True) if i >= 0]

    inputs, row, calls = run_spied(fam, name, keep=0.5, params={"schedule": "first[1]"})
    kept = row["kept"]
    n = kept["n"]
    ident = identities(fam, inputs, n)
    expected = torch.full((n,), -2)
    for rep, out in calls:  # one call per Qwen part; a batch of rows (views, tiles) otherwise
        rows = ident if fam.family not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl") else ident[:, rep[0]]
        assert rows.shape == out.old_to_new.shape
        # a first step's survivors keep their order: new index j is the j-th token not merged away
        holder = torch.stack([r[~m][o] for r, m, o in zip(rows, out.merged, out.old_to_new, strict=True)])
        mine = rows >= 0
        expected[rows[mine]] = holder[mine]
    dropped = sorted(set(range(n)) - set(from_runs(kept["index"])))
    newline = (expected == -2).nonzero()[:, 0].tolist()
    assert all(i in from_runs(kept["index"]) for i in newline)  # only LLaVA-NeXT newlines are no merge input
    assert calls and dropped and kept["merged_into"] == expected[dropped].tolist()


def _as_video(fam):
    """The tiny Qwen processor has no video processor: a 2-slice video made of two equal images' patches (the
    ViT sees the same tensor either way), its placeholders one run of video tokens in one vision span."""
    cfg = fam.model.config
    from prunebench.data.shapes import make_sample

    image = make_sample(0, image_size=fam.image_side).image
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    two = fam.processor(images=[image, image], text=fam.processor.apply_chat_template(conv, add_generation_prompt=True),
                        return_tensors="pt")
    ids = two["input_ids"][0].tolist()
    start, end = cfg.vision_start_token_id, cfg.vision_end_token_id
    first, last = ids.index(start), len(ids) - 1 - ids[::-1].index(end)
    n = sum(1 for i in ids if i == cfg.image_token_id)
    video_ids = ids[: first + 1] + [cfg.video_token_id] * n + ids[last:]
    (t, h, w), _ = two["image_grid_thw"].tolist()
    return {"input_ids": torch.tensor([video_ids]), "attention_mask": torch.ones(1, len(video_ids), dtype=torch.long),
            "pixel_values_videos": two["pixel_values"], "video_grid_thw": torch.tensor([[2 * t, h, w]])}


def test_qwen_video_rows_keep_per_slice_and_lay_out_frames(fam):
    if fam.family not in ("qwen2_5_vl", "qwen2_vl"):
        pytest.skip("Qwen2 / Qwen2.5-VL videos")
    inputs = _as_video(fam)
    merge = fam.model.config.vision_config.spatial_merge_size
    _, h, w = inputs["video_grid_thw"][0].tolist()
    with install(fam.seams, resolve_method("random_pre"), keep=0.25, seed=0) as inst:
        rows = generate_batch_timed(loaded_of(fam), inputs, inst, NullTimer(), [0], 3)
    kept = rows[0]["kept"]
    per_slice = (h // merge) * (w // merge)
    assert kept["n"] == 2 * per_slice == rows[0]["n_visual_in"]
    assert [(u["kind"], u["frame"], u["grid"]) for u in kept["layout"]] == \
        [("frame", 0, [h // merge, w // merge]), ("frame", 1, [h // merge, w // merge])]
    index = from_runs(kept["index"])
    assert len(index) == rows[0]["n_visual_out"] == 2 * round(0.25 * per_slice)  # the budget per temporal slice
    assert sorted(locate(kept["layout"], i)[0] for i in index) == [0] * (len(index) // 2) + [1] * (len(index) // 2)


def test_mustdrop_groups_point_at_tokens_still_kept(tiny):
    """MustDrop merges in the encoder and drops again inside the LLM: a dropped token maps to a token that is
    kept at the end, or to -1 when its holder was dropped later (never to a dropped token, nor to itself)."""
    _, rows, _ = run_rows(tiny, "mustdrop", keep=0.25)
    kept = rows[0]["kept"]
    index = set(from_runs(kept["index"]))
    into = kept["merged_into"]
    assert len(into) == kept["n"] - len(index)
    assert all(t == -1 or t in index for t in into) and any(t >= 0 for t in into)


def test_a_token_whose_holder_was_dropped_later_is_held_by_none():
    from prunebench.kept import merge_groups
    from prunebench.stages.state import CallState

    state = CallState()
    state.prompt_image_mask = torch.ones(1, 6, dtype=torch.bool)
    state.merge_groups = ([torch.tensor([0, 0, 2, 2, 4, 4])], [6])  # the encoder merged pairs into 0, 2, 4
    # an LLM stage then dropped 2: its own token and the one merged into it are held by no kept token
    assert merge_groups(state, 0, torch.tensor([0, 4])) == [0, -1, -1, 4]
