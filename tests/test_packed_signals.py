"""[CLS]-attention signals on the packed families (LLaVA-NeXT, LLaVA-OneVision): the signal a method
receives for a packed token equals the signal of the view and patch it comes from, computed
independently from an eager tower (output_attentions) per view and mapped through a view * P + patch
marker packed by the model's own `pack_image_features`; OneVision video frames get the mean of each
pooled token's 2x2 source patches (bilinear pooling by an exact factor 2)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from prunebench.methods import resolve_method
from prunebench.stages import install
from prunebench.stages.patches import MethodWrap
from prunebench.stages.vision_signals import encoder_layers

PACKED = ["llava_next", "llava_onevision"]


@pytest.fixture(scope="module", params=PACKED)
def packed(request, tmp_path_factory):
    from conftest import load_tiny, tiny_checkpoint

    path = tiny_checkpoint(request.param, tmp_path_factory)
    return load_tiny(path, family=request.param), load_tiny(path, attn="eager", family=request.param)


def wide_inputs(tiny, size: tuple[int, int] = (96, 40)):
    """A 96x40 image: base view + a crop grid, unpadded (not square) -> newlines at row ends.
    288x288 on OneVision: 6x6 crops, downscaled by the model's anyres_max_9 bilinear interpolation."""
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = tiny.processor.apply_chat_template(conv, add_generation_prompt=True)
    image = Image.new("RGB", size, (200, 40, 40))
    image.paste((20, 20, 200), (10, 5, 50, 30))
    return tiny.processor(images=image, text=prompt, return_tensors="pt")


def spy_signals(tiny, inputs, name: str, keep: float = 0.25) -> list[dict[str, torch.Tensor]]:
    """The signals (candidate rows: newlines excluded) each packed image's call received."""
    method = resolve_method(name)
    seen: list[dict[str, torch.Tensor]] = []

    def spy(ctx, **kw):
        seen.append({k: v[0].clone() for k, v in ctx.signals.items()})
        return method.spec.fn(ctx, **kw)

    spied = dataclasses.replace(method, spec=dataclasses.replace(method.spec, fn=spy))
    with install(tiny.seams, spied, keep=keep, seed=0), torch.no_grad():
        tiny.model(**inputs)
    return seen


def eager_views(eager, inputs) -> tuple[torch.Tensor, tuple, dict]:
    """Per view [V, P] signal at the selected layer from eager attention (NeXT: head-mean [CLS] row;
    OneVision: mean attention each patch receives, over heads and queries), plus the arguments the
    model packed its images with."""
    inner = eager.model.model
    calls: dict[str, object] = {}
    def grab(module, args, kwargs) -> None:
        calls.setdefault("pix", args[0] if args else kwargs["pixel_values"])

    def grab_pack(owner, args, kwargs) -> None:
        calls.setdefault("pack", (args, kwargs))

    tower = inner.vision_tower.register_forward_pre_hook(grab, with_kwargs=True)
    wrap = MethodWrap(inner, "pack_image_features", before=grab_pack)
    try:
        with torch.no_grad():
            eager.model(**inputs)
            att = inner.vision_tower(calls["pix"], output_attentions=True).attentions
    finally:
        tower.remove()
        wrap.remove()
    layer = eager.model.config.vision_feature_layer
    a = att[layer].float()  # [V, H, T, T]
    rows = a[:, :, 0, 1:].mean(1) if eager.seams.vision_prefix else a.mean(dim=(1, 2))
    return rows, *calls["pack"]


def marker_sources(inner, views: int, patches: int, args: tuple, kwargs: dict) -> torch.Tensor:
    """For every packed non-newline token, view * P + patch of its source (the model's own packing)."""
    marker = torch.arange(views * patches, dtype=torch.float64).view(views, patches, 1)
    sizes = [f.shape[0] for f in args[0]]
    rest = {k: v for k, v in kwargs.items() if k != "image_newline"}
    packed, _ = type(inner).pack_image_features(inner, list(marker.split(sizes)), *args[1:],
                                                image_newline=torch.full((1,), -1.0, dtype=torch.float64), **rest)
    return [p[p[:, 0] >= 0, 0].long() for p in packed]


def test_packed_token_signal_is_its_source_patch_signal(packed):
    tiny, eager = packed
    inputs = wide_inputs(tiny)
    rows, args, kwargs = eager_views(eager, inputs)
    views, patches = rows.shape
    assert views > 1  # base view + crops
    sources = marker_sources(tiny.model.model, views, patches, args, kwargs)
    seen = spy_signals(tiny, inputs, "fastervlm")
    assert len(seen) == len(sources) == 1
    torch.testing.assert_close(seen[0]["cls_attention"], rows.flatten()[sources[0]], atol=1e-5, rtol=0)
    assert len(set(sources[0].tolist())) == sources[0].numel()  # every packed token has its own patch


def test_packed_keys_and_full_width_row(packed):
    """cls_keys / cls_attention_full on packed tokens = head-mean keys / the single-head [CLS] row of the
    source view and patch, recomputed here from the layer's k_proj / q_proj outputs."""
    tiny, eager = packed
    inputs = wide_inputs(tiny)
    rows, args, kwargs = eager_views(eager, inputs)
    views, patches = rows.shape
    sources = marker_sources(tiny.model.model, views, patches, args, kwargs)[0]
    layer = encoder_layers(tiny.seams)[-1].self_attn  # PruMerge: the last encoder layer
    cap: dict[str, torch.Tensor] = {}

    def grab(name: str):
        def hook(module, args, output) -> None:
            cap.setdefault(name, output)
        return hook

    hooks = [layer.q_proj.register_forward_hook(grab("q")), layer.k_proj.register_forward_hook(grab("k"))]
    try:
        seen = spy_signals(tiny, inputs, "prumerge")[0]
    finally:
        for h in hooks:
            h.remove()
    q, k = cap["q"].float(), cap["k"].float()
    start = tiny.seams.vision_prefix
    head_keys = k.view(*k.shape[:2], -1, layer.head_dim).mean(2)[:, start:]
    if start:  # NeXT: one head of full width, [CLS] query
        full = torch.stack([torch.softmax(q[v, 0] @ k[v].T * k.shape[-1] ** -0.5, -1)[1:] for v in range(views)])
        torch.testing.assert_close(seen["cls_attention_full"], full.flatten()[sources], atol=1e-5, rtol=0)
        torch.testing.assert_close(seen["cls_keys_full"], k[:, 1:].reshape(-1, k.shape[-1])[sources],
                                   atol=1e-5, rtol=0)
    else:  # OneVision: received attention and head-mean keys for the full-width names too
        torch.testing.assert_close(seen["cls_attention_full"], rows.flatten()[sources], atol=1e-5, rtol=0)
        torch.testing.assert_close(seen["cls_keys_full"], head_keys.reshape(-1, head_keys.shape[-1])[sources],
                                   atol=1e-5, rtol=0)


def test_onevision_video_frame_signal_is_the_mean_of_its_source_patches(tmp_path_factory):
    from conftest import load_tiny, tiny_checkpoint
    from test_video import video_inputs

    path = tiny_checkpoint("llava_onevision", tmp_path_factory)
    tiny, eager = load_tiny(path, family="llava_onevision"), load_tiny(path, attn="eager", family="llava_onevision")
    inputs = video_inputs(tiny, frames=3)
    seen = spy_signals(tiny, inputs, "fastervlm")
    pixels = inputs["pixel_values_videos"]
    with torch.no_grad():
        att = eager.seams.vision_tower(pixels.flatten(0, 1), output_attentions=True).attentions
    received = att[eager.model.config.vision_feature_layer].float().mean(dim=(1, 2))  # [frames, P]
    side = int(received.shape[1] ** 0.5)
    assert side % 2 == 0  # bilinear pooling by exactly 2: each pooled token = mean of a 2x2 block
    frames = [s for s in seen if s["cls_attention"].numel() > 0]
    assert len(frames) == pixels.shape[1]
    for got, frame in zip(frames, received, strict=True):
        grid = frame.view(side, side)
        want = [grid[2 * i: 2 * i + 2, 2 * j: 2 * j + 2].mean() for i in range(side // 2) for j in range(side // 2)]
        torch.testing.assert_close(got["cls_attention"], torch.stack(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(96, 40), (288, 288)])
@pytest.mark.parametrize("name", ["fastervlm", "vispruner", "holov", "visionzip", "prumerge", "prumerge_plus"])
def test_packed_budget_counts_candidates_only(packed, name, size):
    """keep=0.25 on a wide / a large image: the LLM receives the newlines plus round(keep * candidates)
    (+1 for PruMerge's aggregate token)."""
    from prunebench.methods.base import n_keep_for

    tiny, eager = packed
    inputs = wide_inputs(tiny, size)
    rows, args, kwargs = eager_views(eager, inputs)
    candidates = marker_sources(tiny.model.model, *rows.shape, args, kwargs)[0].numel()
    lengths: list[int] = []
    hook = tiny.seams.decoder_layers[0].register_forward_pre_hook(
        lambda m, a, k: lengths.append((a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        with torch.no_grad():
            tiny.model(**inputs)
            with install(tiny.seams, resolve_method(name), keep=0.25, seed=0):
                tiny.model(**inputs)
    finally:
        hook.remove()
    n_visual = tiny.n_visual(inputs)
    newlines = n_visual - candidates
    assert newlines > 1
    k = n_keep_for(0.25, candidates)[0]
    extra = 1 if name.startswith("prumerge") else 0
    assert lengths[0] - lengths[1] == n_visual - (newlines + k + extra)


# --- PruMerge(+) adaptive mode: the pure functions against a brute-force reading of the official code ---


def brute_outliers(row: list[float]) -> list[int]:
    """Indices above Q3 + 1.5 IQR, percentiles by linear interpolation written out (numpy's default)."""
    s = sorted(row)

    def pct(p: float) -> float:
        pos = p * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    upper = pct(0.75) + 1.5 * (pct(0.75) - pct(0.25))
    return [i for i, v in enumerate(row) if v > upper]


@pytest.mark.parametrize("seed", range(6))
def test_adaptive_selection_matches_brute_force(seed):
    from prunebench.methods.prumerge_ops import adaptive_count, prumerge_plus_adaptive_select

    g = torch.Generator().manual_seed(seed)
    n = [576, 144, 100, 64, 37, 576][seed]
    attn = torch.rand(1, n, generator=g, dtype=torch.float64) ** 8  # heavy tail: a few outliers
    outliers = brute_outliers(attn[0].tolist())
    assert adaptive_count(attn) == max(1, len(outliers))
    top = sorted(range(n), key=lambda i: -attn[0, i].item())[: max(1, len(outliers))]
    step = max(1, int(int(1 / (len(top) / n)) / 3))  # official int(1 / ratio) / 3, ratio = c / N
    want = sorted(set(top) | {i for i in range(0, n - 1, step)})
    assert prumerge_plus_adaptive_select(attn)[0].tolist() == want


def test_adaptive_must_be_a_bool():
    from prunebench.errors import UserError

    with pytest.raises(UserError, match="prumerge: method.params.adaptive must be true or false, got 'yes'"):
        resolve_method("prumerge", {"adaptive": "yes"})  # typed check of the parameter, before any model loads


@pytest.mark.parametrize("name", ["fastervlm", "vispruner", "holov", "visionzip", "prumerge", "prumerge_plus"])
def test_onevision_video_keep_one_is_vanilla_and_budget_is_per_frame(tmp_path_factory, name):
    from conftest import load_tiny, tiny_checkpoint
    from test_video import video_inputs

    tiny = load_tiny(tiny_checkpoint("llava_onevision", tmp_path_factory), family="llava_onevision")
    inputs = video_inputs(tiny)
    with torch.no_grad():
        ref = tiny.model(**inputs).logits
        with install(tiny.seams, resolve_method(name), keep=1.0):
            assert torch.equal(tiny.model(**inputs).logits, ref)
        with install(tiny.seams, resolve_method(name), keep=0.34) as inst:
            tiny.model(**inputs)
    assert inst.counts.n_visual_in == 6 * 9 + 1  # 6 frames of 3x3 pooled tokens + one newline
    per_frame = 3 + (1 if name.startswith("prumerge") else 0)  # round(0.34 * 9) (+ the aggregate token)
    assert inst.counts.n_visual_out == 6 * per_frame + 1 and inst.counts.n_fixed == 1
