"""MustDrop's vision-encoder stages against naive loops of the official definitions
(liuting20/MustDrop `local_merge.py`, `clip_encoder.py`), and their hand-off to the LLM stages."""

from __future__ import annotations

import math

import pytest
import torch

from prunebench.errors import UserError
from prunebench.methods import resolve_method
from prunebench.methods.mustdrop_ops import key_set, key_set_size, window_merge, window_scores
from prunebench.stages import install
from prunebench.stages.vision_signals import encoder_layers


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (max(a.norm(), 1e-8) * max(b.norm(), 1e-8)))


def _loop_windows(h: int, w: int, ws: int) -> list[list[int]]:
    """Windows in raster order, members row-major (official unfold order)."""
    return [[(gy * ws + y) * w + gx * ws + x for y in range(ws) for x in range(ws)]
            for gy in range(h // ws) for gx in range(w // ws)]


def _loop_scores(x: torch.Tensor, h: int, w: int, ws: int) -> list[float]:
    out = []
    for win in _loop_windows(h, w, ws):
        pairs = [_cos(x[i], x[j]) for i in win for j in win if i != j]
        out.append(sum(pairs) / len(pairs))
    return out


def _toy(b: int, h: int, w: int, d: int, seed: int, smooth: set[int]) -> torch.Tensor:
    """[B, 1 + h*w, D]: [CLS] + patches; windows in `smooth` get nearly parallel patches (high cosine)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1 + h * w, d, generator=g)
    for k, win in enumerate(_loop_windows(h, w, 3)):
        if k in smooth:
            base = torch.randn(b, 1, d, generator=g)
            x[:, [1 + i for i in win]] = base + 0.05 * (k + 1) * torch.randn(b, 9, d, generator=g)
    return x


def test_window_scores_match_a_loop():
    x = _toy(2, 6, 9, 7, seed=1, smooth={1, 4})
    got = window_scores(x[:, 1:], torch.tensor(_loop_windows(6, 9, 3)))
    for b in range(2):
        torch.testing.assert_close(got[b].double(), torch.tensor(_loop_scores(x[b, 1:], 6, 9, 3), dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", ["merged_first", "raster"])
@pytest.mark.parametrize("threshold", [0.8, 0.95, -1.0, 1.0])
def test_window_merge_matches_a_loop(threshold, order):
    """Windows >= threshold (batch-minimum count, top by score) become one size-weighted token standing for
    their last member; the rest untouched; sum(size * x) and sum(size) are conserved. merged_first: the
    official `cat([x_cls, dst, unm])` order (merged by descending score, then unmerged in raster order)."""
    h, w, d = 6, 9, 5
    x = _toy(2, h, w, d, seed=2, smooth={0, 2, 3})
    g = torch.Generator().manual_seed(5)
    size = torch.randint(1, 4, (2, 1 + h * w), generator=g).float()
    rep = torch.cat([torch.tensor([-1]), torch.arange(h * w)]).expand(2, -1).clone()
    out = window_merge(x, size, rep, (h, w), 3, threshold, order=order)
    wins = _loop_windows(h, w, 3)
    scores = [_loop_scores(x[b, 1:], h, w, 3) for b in range(2)]
    r = min(sum(s >= threshold for s in sc) for sc in scores)
    for b in range(2):
        chosen = sorted(range(len(wins)), key=lambda k: (-scores[b][k], k))[:r]
        gone = {i for k in chosen for i in wins[k][:-1]}
        merged = {wins[k][-1]: wins[k] for k in chosen}
        want_rep = [-1] + [p for p in range(h * w) if p not in gone]
        if order == "merged_first":
            dst = [wins[k][-1] for k in chosen]
            want_rep = [-1] + dst + [p for p in want_rep[1:] if p not in dst]
        assert out.rep[b].tolist() == want_rep
        for p in range(h * w):  # every old token points at the survivor standing for it
            stands = next((wins[k][-1] for k in chosen if p in wins[k]), p)
            assert int(out.rep[b, out.old_to_new[b, 1 + p]]) == stands
        for t, p in enumerate(want_rep):
            members = [p] if p not in merged else merged[p]
            s = [float(size[b, 1 + i]) if p >= 0 else float(size[b, 0]) for i in members]
            v = [x[b, 1 + i] if p >= 0 else x[b, 0] for i in members]
            want = sum(si * vi for si, vi in zip(s, v, strict=True)) / sum(s)
            torch.testing.assert_close(out.x[b, t], want, atol=1e-5, rtol=1e-5)
            assert float(out.size[b, t]) == sum(s)
        torch.testing.assert_close((out.x[b] * out.size[b, :, None]).sum(0), (x[b] * size[b, :, None]).sum(0),
                                   atol=1e-4, rtol=1e-5)
        assert float(out.size[b].sum()) == float(size[b].sum())
    assert out.x.shape[1] == 1 + h * w - 8 * r


def test_key_set_is_the_top_ceil_ratio_by_cls_attention():
    g = torch.Generator().manual_seed(0)
    for m, ratio in [(576, 0.08), (36, 0.08), (25, 0.08), (10, 0.5), (7, 0.0), (7, 1.0)]:
        att = torch.rand(3, m, generator=g)
        got = key_set(att, ratio)
        k = math.ceil(ratio * m)
        for b in range(3):
            want = sorted(range(m), key=lambda j: -float(att[b, j]))[:k]
            assert got[b].nonzero()[:, 0].tolist() == sorted(want)
    assert key_set_size(576, 0.08) == 47  # official: ceil(0.08 * 576) = ceil(46.08)


def _md(**params) -> object:
    return resolve_method("mustdrop", params)


def _eager_cls_key_set(eager, inputs, ratio: float) -> list[int]:
    """Top ceil(ratio * N) patches by the last CLIP layer's eager head-mean [CLS] row (no merge)."""
    vision = eager.model.model.vision_tower
    with torch.no_grad():
        att = vision(inputs["pixel_values"], output_attentions=True).attentions[-1]  # [1, H, T, T]
    row = att[0, :, 0, 1:].float().mean(0)
    k = math.ceil(ratio * row.numel())
    return sorted(sorted(range(row.numel()), key=lambda j: -float(row[j]))[:k])


def test_key_set_reaches_the_llm_and_is_never_dropped(tiny, tiny_path):
    """No window merges (merge_thr=1): the protected rows at the LLM entry are the eager [CLS] key set, and
    with thresholds dropping everything, every stage keeps exactly the key set (plus the one-token floor)."""
    from conftest import load_tiny

    eager = load_tiny(tiny_path, attn="eager")
    inputs = eager.inputs()
    n = eager.n_visual(inputs)
    want = _eager_cls_key_set(eager, inputs, 0.25)
    method = _md(merge_thr=1.0, key_ratio=0.25, global_thr=1.0, individual_thr=1.0)

    def key_set(inst, hidden):
        if inst.state.phase == "prefill" and inst.state.protected is not None:
            image = inst.state.image_mask[0]
            return {"key": inst.state.protected[0][image].nonzero()[:, 0].tolist()}
        return None

    inst, seen = _at_first_decoder_layer(tiny, method, inputs, key_set)
    assert seen["key"] == want and 0 < len(want) < n
    assert inst.state.stage_counts["entry"].n_visual_out == n  # nothing merged
    image_rows = torch.isin(inputs["input_ids"][0], torch.tensor(tiny.seams.image_token_ids)).nonzero()[:, 0]
    for stage in inst.state.intra_stages:
        kept = torch.isin(image_rows, stage.index[0]).nonzero()[:, 0].tolist()
        assert set(want) <= set(kept) and len(kept) <= len(want) + 1
    assert inst.counts.schedule[-1][1] in (len(want), len(want) + 1)


def test_window_merge_shortens_the_llm_input(tiny):
    """merge_thr=-1 merges every 3x3 window: 36 patches -> 4 tokens at the windows' bottom-right slots,
    key set ceil(0.08 * 4) = 1; the LLM runs on full - 32 rows from layer 0 and the record starts from 4."""
    inputs = tiny.inputs()
    full, n = inputs["input_ids"].shape[1], tiny.n_visual(inputs)
    with install(tiny.seams, _md(merge_thr=-1.0, global_thr=0.0, individual_thr=0.0), keep=0.5, seed=0) as inst, \
            torch.no_grad():
        out = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    entry = inst.state.entry
    image_rows = torch.isin(inputs["input_ids"][0], torch.tensor(tiny.seams.image_token_ids)).nonzero()[:, 0]
    assert torch.isin(image_rows, entry.index[0]).nonzero()[:, 0].tolist() == [14, 17, 32, 35]
    assert entry.index.shape[1] == full - n + 4
    assert inst.state.stage_counts["entry"].n_visual_out == 4 and inst.counts.n_visual_in == n
    assert [c for _, c in inst.counts.schedule] == [4] * len(inst.counts.schedule)
    assert inst.counts.layer_avg == pytest.approx(4.0)
    assert out.shape[1] == full + 3


def _layer0_window_order(tiny, inputs) -> list[int]:
    """The 4 windows of the tiny 6x6 grid by descending mean off-diagonal cosine of CLIP layer 0's output
    (a loop), the official `similarity_map.topk(r)` order."""
    got = {}

    def keep(module, args, out):
        got.setdefault("x", out[0] if isinstance(out, tuple) else out)

    handle = encoder_layers(tiny.seams)[0].register_forward_hook(keep)
    try:
        with torch.no_grad():
            tiny.model(**inputs)
    finally:
        handle.remove()
    scores = _loop_scores(got["x"][0, 1:], 6, 6, 3)
    return sorted(range(4), key=lambda k: (-scores[k], k))


def _at_first_decoder_layer(tiny, method, inputs, grab) -> tuple[object, dict]:
    """One forward with `method` installed at keep 0.5; `grab(inst, hidden)` sees each call of the first decoder
    layer until it returns a dict. Returns (the installation, that dict)."""
    seen: dict = {}

    def spy(module, args, kwargs):
        if not seen:
            seen.update(grab(inst, args[0] if args else kwargs["hidden_states"]) or {})

    with install(tiny.seams, method, keep=0.5, seed=0) as inst, torch.no_grad():
        handle = tiny.seams.decoder_layers[0].register_forward_pre_hook(spy, with_kwargs=True)
        try:
            tiny.model(**inputs)
        finally:
            handle.remove()
    return inst, seen


def _llm_image(tiny, inputs, method) -> tuple[torch.Tensor, torch.Tensor]:
    """(image-block rows of inputs_embeds as the first decoder layer gets them, their protected flags)."""
    def image_rows(inst, hidden):
        image = inst.state.image_mask[0]
        return {"x": hidden[0][image].clone(), "key": inst.state.protected[0][image].clone()}

    _, seen = _at_first_decoder_layer(tiny, method, inputs, image_rows)
    return seen["x"], seen["key"]


def test_llm_reads_the_merged_windows_in_the_official_order(tiny):
    """merge_thr=-1: all four 3x3 windows merge. Default token_order=merged_first: the LLM's image block is the
    merged windows by descending score (the official order); raster: by window position. Same tokens, and the
    key-set flag travels with its token."""
    inputs = tiny.inputs()
    order = _layer0_window_order(tiny, inputs)
    assert order != sorted(order)  # the tiny image's windows do not score in raster order
    params = dict(merge_thr=-1.0, key_ratio=0.25, global_thr=0.0, individual_thr=0.0)
    official, official_key = _llm_image(tiny, inputs, _md(**params))
    raster, raster_key = _llm_image(tiny, inputs, _md(token_order="raster", **params))
    assert official.shape[0] == raster.shape[0] == 4
    torch.testing.assert_close(official, raster[order], atol=1e-4, rtol=1e-4)
    assert torch.equal(official_key, raster_key[order]) and int(official_key.sum()) == 1


def test_bad_token_order_is_one_line(tiny):
    with pytest.raises(UserError, match=r"^mustdrop: method.params.token_order must be one of: merged_first, raster, "
                                         r"got 'cls'$"):
        with install(tiny.seams, _md(token_order="cls"), keep=0.5, seed=0):
            pass


def test_card_states_the_token_order():
    card = resolve_method("mustdrop").describe()
    assert card["params"]["token_order"] == "merged_first"
    text = " ".join(card["deviations"])
    assert "token_order=merged_first (default)" in text and "token_order=raster" in text


def test_keep_one_installs_no_vision_stage(tiny):
    inputs = tiny.inputs()
    with torch.no_grad():
        ref = tiny.model(**inputs).logits
    with install(tiny.seams, _md(merge_thr=-1.0), keep=1.0, seed=0) as inst, torch.no_grad():
        logits = tiny.model(**inputs).logits
    assert torch.equal(logits, ref) and inst.state.entry is None


@pytest.mark.parametrize(("params", "match"), [
    ({"window": 1}, "window must be an integer >= 2"),
    ({"window": 4}, "does not divide"),
    ({"merge_thr": 2.0}, r"merge_thr must be a cosine in \[-1, 1\]"),
    ({"key_ratio": -0.1}, r"key_ratio must be in \[0, 1\]"),
    ({"vision_stages": "yes"}, "vision_stages must be true or false"),
])
def test_bad_vision_parameters_are_refused(tiny, params, match):
    with pytest.raises(UserError, match=match):
        with install(tiny.seams, _md(**params), keep=0.5, seed=0):
            pass


def test_other_families_refuse_the_vision_stages_but_run_the_llm_stages(fam):
    inputs = fam.inputs()
    if fam.family == "llava":
        pytest.skip("llava runs the vision stages")
    with pytest.raises(UserError, match=f"not supported on the {fam.family} family.*vision_stages=false"):
        with install(fam.seams, _md(), keep=0.5, seed=0):
            pass
    with install(fam.seams, _md(vision_stages=False), keep=0.5, seed=0) as inst, torch.no_grad():
        fam.model(**inputs)
    assert inst.counts.n_visual_in == fam.n_visual(inputs) and inst.state.protected is None


def test_compose_refuses_a_second_stage_with_the_vision_stages(tiny):
    method = resolve_method("compose", {"stages": [{"name": "random_pre"}, {"name": "mustdrop"}]})
    with pytest.raises(UserError, match="own vision-encoder stages"):
        with install(tiny.seams, method, keep=0.25, seed=0):
            pass


def test_runner_records_the_merged_entry_and_schedule(tiny_path, tmp_path):
    """End to end from configs/method/mustdrop.yaml: the record's LLM input is the merged image (every
    3x3 window of the tiny grid merges at merge_thr=-1: 4 tokens), layer_avg and llm_schedule start there."""
    from test_runner import config

    from prunebench import runner
    from prunebench.methods.base import layer_average
    from prunebench.record import load_record

    rec = load_record(runner.run(config(tiny_path, tmp_path, "method=mustdrop", "keep=0.111",
                                        "method.params.merge_thr=-1.0"), quiet=True))
    assert rec.tokens["n_visual_in"] == 36 and rec.tokens["llm_prompt_len"] == rec.tokens["prompt_len"] - 32
    schedule = [(k, n) for k, n in rec.tokens["llm_schedule"]]
    assert all(n <= 4 for _, n in schedule) and rec.tokens["n_visual_out"] == schedule[-1][1]
    assert rec.tokens["layer_avg"] == pytest.approx(layer_average(4, 4, schedule))
    assert rec.method_card["params"]["vision_stages"] is True and rec.method_card["positions"] == "contiguous"
