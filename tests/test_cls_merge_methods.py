"""VisionZip / PruMerge / PruMerge+ end to end on tiny LLaVA-1.5: the visual rows entering the LLM
equal the projector applied to a reference merge computed the official way (eager attentions /
hooked last-layer q, k and hidden_states[-2] of a separate tower run, naive loops), and the
methods' bad hyper-parameters are refused."""

from __future__ import annotations

import math

import pytest
import torch
from test_cls_merge_ops import prumerge_reference, visionzip_reference

from prunebench.errors import UserError
from prunebench.methods import resolve_method
from prunebench.methods.base import n_keep_for
from prunebench.methods.prumerge_ops import extra_slot, iqr_outlier_count, uniform_fill
from prunebench.methods.visionzip_ops import visionzip_split
from prunebench.stages import install


def llm_visual_rows(fam, name: str, keep: float, **params) -> torch.Tensor:
    """[k', D] the visual rows of the sequence entering decoder layer 0 under the method."""
    seen = {}

    def spy(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    handle = fam.seams.decoder_layers[0].register_forward_pre_hook(spy, with_kwargs=True)
    inputs = fam.inputs()
    try:
        with install(fam.seams, resolve_method(name, params), keep=keep, seed=0) as inst, torch.no_grad():
            fam.model(**inputs)
    finally:
        handle.remove()
    mask = inst.state.image_mask[0]  # image rows of the compacted sequence
    return seen["h"][0, mask]


def tower_run(fam, layer: int) -> dict[str, torch.Tensor]:
    """One eager-style run of the CLIP tower with the official hooks: attentions, hidden_states[-2]
    patches and the q/k projections of `layer`."""
    tower = fam.seams.vision_tower
    attn_mod = tower.encoder.layers[layer].self_attn
    cap = {}
    hooks = [attn_mod.q_proj.register_forward_hook(lambda m, a, o: cap.setdefault("q", o)),
             attn_mod.k_proj.register_forward_hook(lambda m, a, o: cap.setdefault("k", o))]
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"  # output_attentions, as the official code
    try:
        with torch.no_grad():
            out = tower(fam.inputs()["pixel_values"], output_attentions=True, output_hidden_states=True)
    finally:
        tower.config._attn_implementation = impl
        for h in hooks:
            h.remove()
    return {"attn": out.attentions[layer], "x": out.hidden_states[-2][0, 1:], "q": cap["q"][0], "k": cap["k"][0],
            "heads": attn_mod.num_heads}


def project(fam, rows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return fam.model.model.multi_modal_projector(rows[None])[0]


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_visionzip_llm_input_equals_official_merge(tiny, keep):
    run = tower_run(tiny, -2)  # official: attentions[-2], hidden_states[-2], layers[-2].metric
    cls_row = run["attn"][0, :, 0, 1:].sum(0)  # head-SUM, as the official
    keys = run["k"][1:].view(-1, run["heads"], run["k"].shape[-1] // run["heads"]).mean(1)  # head-mean raw keys
    n = run["x"].shape[0]
    ref = visionzip_reference(run["x"].double(), cls_row.double(), keys.double(), *visionzip_split(n_keep_for(keep, n)[0]))
    expected = project(tiny, torch.stack([ref[s] for s in sorted(ref)]).float())
    got = llm_visual_rows(tiny, "visionzip", keep)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def prumerge_official_inputs(fam) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features [N, C], cls_attn [N], keys [N, C]) as `token_prune_merge_advanced`: last-layer q/k hooks,
    attn = softmax(q k^T * C^-1/2), row 0 without its [CLS] column."""
    run = tower_run(fam, -1)
    c = run["x"].shape[-1]
    attn = ((run["q"] @ run["k"].T) * c**-0.5).softmax(dim=-1)
    return run["x"].double(), attn[0, 1:].double(), run["k"][1:].double()


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_prumerge_llm_input_equals_official_loop(tiny, name, keep):
    x, cls_attn, keys = prumerge_official_inputs(tiny)
    n = x.shape[0]
    k = n_keep_for(keep, n)[0]
    if name == "prumerge":
        kept = sorted(cls_attn.topk(k).indices.tolist())
    else:  # top min(IQR outliers, k), uniform fill over the rest
        top = cls_attn.topk(min(int(iqr_outlier_count(cls_attn[None])[0]), k)).indices
        kept = sorted(top.tolist() + uniform_fill(top, n, k - top.numel()).tolist())
    merged, extra = prumerge_reference(x, cls_attn, keys, kept)
    slot = int(extra_slot(torch.tensor([kept]), n)[0])
    rows = {**merged, slot: extra}
    expected = project(tiny, torch.stack([rows[s] for s in sorted(rows)]).float())
    got = llm_visual_rows(tiny, name, keep)
    assert got.shape[0] == k + 1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_prumerge_plus_differs_from_prumerge(tiny):
    assert not torch.equal(llm_visual_rows(tiny, "prumerge", 0.25), llm_visual_rows(tiny, "prumerge_plus", 0.25))


@pytest.mark.parametrize(("name", "params"), [
    ("visionzip", {"contextual_share": 1.5}),
    ("visionzip", {"contextual_share": "many"}),
    ("prumerge", {"n_neighbours": 0}),
    ("prumerge_plus", {"n_neighbours": 2.5}),
])
def test_bad_hyper_parameters_are_refused(tiny, name, params):
    with pytest.raises(UserError, match=name.split("_")[0]):
        llm_visual_rows(tiny, name, 0.25, **params)


def test_official_visionzip_split_round_trip():
    assert all(visionzip_split(d + c) == (d, c) for d, c in [(54, 10), (108, 20), (162, 30)])
    assert math.isclose(10 / 64, 20 / 128)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"], scope="session")
@pytest.mark.parametrize("name", ["visionzip", "prumerge"])
def test_merge_space_is_recorded(fam, family, name):
    """Encoder feature space where the projector rows allow it (LLaVA); elsewhere (Qwen's merger)
    after the projector, with a note in the record."""
    with install(fam.seams, resolve_method(name), keep=0.25, seed=0) as inst, torch.no_grad():
        fam.model(**fam.inputs())
    after_projector = [n for n in inst.notes if "merges after the projector" in n]
    assert bool(after_projector) == (family != "llava")
    assert inst.counts.n_visual_out < inst.counts.n_visual_in
