"""Qwen3-VL through the family seam: its shipped architectures, its Qwen3 decoder's q/k norms, and DeepStack under
every stage — a pruned visual token leaves every injected level, and each level's rows are those of the visual
tokens still in the sequence (identified here from the hidden states themselves, not from the stage's state)."""

from __future__ import annotations

import json

import pytest
import torch

from prunebench.families import FAMILIES
from prunebench.methods import resolve_method
from prunebench.models.loader import ARCH_DIR
from prunebench.stages import install

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def q3(tmp_path_factory):
    from conftest import load_tiny, tiny_checkpoint

    return load_tiny(tiny_checkpoint("qwen3_vl", tmp_path_factory), family="qwen3_vl")


# -- shipped architectures ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, billions", [("qwen3-vl-8b", 8.77), ("qwen3-vl-4b", 4.44), ("qwen3-vl-2b", 2.13)])
def test_shipped_architecture_is_the_reference_config(name, billions):
    """arch/<name>.json is what the fixtures write, DeepStack at three ViT blocks, and the parameter count is the
    model card's (counted on the meta device)."""
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    from prunebench.fixtures.tiny_qwen3vl import qwen3_vl_reference_config

    shipped = json.loads((ARCH_DIR / f"{name}.json").read_text())
    assert shipped == json.loads(qwen3_vl_reference_config(name).to_json_string())
    config = AutoConfig.for_model(**shipped)
    assert len(config.vision_config.deepstack_visual_indexes) == 3
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen3VLForConditionalGeneration._from_config(config).parameters())
    assert n / 1e9 == pytest.approx(billions, abs=0.01)


def test_local_processor_matches_the_architecture():
    """weights=random: the local processor's token ids overwrite the config's, and its images cost 32 px a token."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**json.loads((ARCH_DIR / "qwen3-vl-8b.json").read_text()))
    processor, overrides = FAMILIES.get("qwen3_vl").local_processor(config)
    assert overrides["image_token_id"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert processor.image_processor.patch_size * processor.image_processor.merge_size == 32


# -- the decoder's attention inputs --------------------------------------------------------------------------------
def test_decoder_rows_are_read_after_the_qk_norms(q3):
    """The captured q/k are the per-head-normalised ones the layer attends with: the recomputed last-query row
    equals eager attention's own row at layer K-1."""
    from conftest import load_tiny

    from prunebench.stages.attention import last_query_attention

    eager = load_tiny(q3.path, attn="eager", family="qwen3_vl")
    inputs = eager.inputs()
    access, layer = eager.seams.decoder, eager.seams.decoder_layers[1]
    q_mod, k_mod = access.qk_modules(layer)
    assert (q_mod, k_mod) == (layer.self_attn.q_norm, layer.self_attn.k_norm)
    seen = {}
    hooks = [q_mod.register_forward_hook(lambda m, a, o: seen.__setitem__("q", access.flat(o))),
             k_mod.register_forward_hook(lambda m, a, o: seen.__setitem__("k", access.flat(o))),
             layer.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("rope", kw["position_embeddings"]),
                                             with_kwargs=True)]
    try:
        with torch.no_grad():
            out = eager.model(**inputs, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    attn = layer.self_attn
    row = last_query_attention(seen["q"], seen["k"], *seen["rope"], head_dim=attn.head_dim, scale=attn.scaling,
                               apply_rope=eager.seams.apply_rope, key_mask=None)
    torch.testing.assert_close(row, out.attentions[1][:, :, -1].float().mean(1), atol=1e-5, rtol=0)


# -- DeepStack under pruning -------------------------------------------------------------------------------------
def _vanilla(q3, inputs):
    """The prompt's DeepStack levels and LLM input as the unpatched model builds them."""
    seen = {}

    def spy(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"].clone(), mask=kwargs["visual_pos_masks"].clone(),
                    levels=[e.clone() for e in kwargs["deepstack_visual_embeds"]])

    handle = q3.seams.language_model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            q3.model(**inputs)
    finally:
        handle.remove()
    return seen


def _injections(q3):
    """Record every `_deepstack_process` call (the hidden rows it gets, the mask and rows it adds)."""
    calls = []
    lm = q3.seams.language_model
    cls_process = type(lm)._deepstack_process

    def spy(self, hidden, mask, embeds):
        calls.append({"hidden": hidden.clone(), "mask": mask.clone(), "embeds": embeds.clone()})
        return cls_process(self, hidden, mask, embeds)

    return calls, spy


def _run_with_spy(q3, method, keep, inputs, params=None):
    """Run the installed method with the class-level `_deepstack_process` spied (what the per-instance wrapper
    finally calls) and the hidden states entering each decoder layer recorded."""
    calls, spy = _injections(q3)
    entering = {}
    lm = q3.seams.language_model
    cls = type(lm)
    original = cls._deepstack_process
    with install(q3.seams, resolve_method(method, params), keep=keep, seed=0):
        hooks = [layer.register_forward_pre_hook(
            lambda m, a, kw, j=j: entering.__setitem__(j, (a[0] if a else kw["hidden_states"]).clone()),
            with_kwargs=True) for j, layer in enumerate(q3.seams.decoder_layers)]  # after the stage's own hooks
        cls._deepstack_process = spy
        try:
            with torch.no_grad():
                q3.model(**inputs)
        finally:
            cls._deepstack_process = original
            for h in hooks:
                h.remove()
    return calls, entering


def _matched_rows(short: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Rows of full [L, D] that short [L', D] holds, in order (a stage keeps the order): each short row is the
    first equal full row after the previous match (text tokens repeat; visual rows are distinct)."""
    eq = (short[:, None, :] == full[None, :, :]).all(-1)  # [L', L]
    out, at = [], -1
    for i in range(short.shape[0]):
        later = eq[i].nonzero()[:, 0]
        later = later[later > at]
        assert later.numel(), f"row {i} of the pruned sequence is no later row of the full one"
        at = int(later[0])
        out.append(at)
    return torch.tensor(out)


def _check_levels(call, rows, vanilla, n_levels_seen):
    """The call adds, to the sequence's rows `rows` (indices into the prompt), exactly those rows' levels."""
    mask, level = vanilla["mask"][0], vanilla["levels"][n_levels_seen]
    ordinal = mask.long().cumsum(0) - 1
    want_mask = mask[rows]
    assert torch.equal(call["mask"][0], want_mask)
    assert torch.equal(call["embeds"], level[ordinal[rows][want_mask]])


@pytest.mark.parametrize("method, params", [("divprune", None), ("random_pre", None)])
def test_pre_llm_drops_the_same_tokens_from_every_level(q3, method, params):
    inputs = q3.inputs()
    vanilla = _vanilla(q3, inputs)
    calls, entering = _run_with_spy(q3, method, 0.25, inputs, params)
    rows = _matched_rows(entering[0][0], vanilla["embeds"][0])  # the prompt rows the LLM kept
    n_visual = int(vanilla["mask"].sum())
    assert int(vanilla["mask"][0][rows].sum()) == round(0.25 * n_visual)
    assert len(calls) == 3
    for i, call in enumerate(calls):
        _check_levels(call, rows, vanilla, i)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_intra_llm_inside_the_injected_layers(q3, k):
    """FastV at K=1, 2 (DeepStack still to come after layers K..2) and K=3 (all injected before): layers before K
    see the full sequence and every level; from K on, the levels follow the rows FastV kept."""
    inputs = q3.inputs()
    vanilla = _vanilla(q3, inputs)
    calls, entering = _run_with_spy(q3, "fastv", 0.25, inputs, {"layer": k})
    ref_calls, ref_entering = _run_with_spy(q3, "vanilla", 1.0, inputs)
    assert len(calls) == 3
    full_rows = torch.arange(vanilla["mask"].shape[1])
    rows = _matched_rows(entering[k][0], ref_entering[k][0])  # rows of the sequence entering K that FastV kept
    assert int(vanilla["mask"][0][rows].sum()) == round(0.25 * int(vanilla["mask"].sum()))
    for i, call in enumerate(calls):  # level i is added to the output of layer i
        _check_levels(call, full_rows if i < k else rows, vanilla, i)


def test_pre_llm_then_intra_llm_compose(q3):
    """A pipeline (pre-LLM then intra-LLM at K=2): the levels follow the composition of both compactions."""
    inputs = q3.inputs()
    vanilla = _vanilla(q3, inputs)
    params = {"stages": [{"name": "divprune", "keep": 0.5}, {"name": "fastv", "keep": 0.5, "params": {"layer": 2}}]}
    calls, entering = _run_with_spy(q3, "compose", 0.25, inputs, params)
    entry_rows = _matched_rows(entering[0][0], vanilla["embeds"][0])
    assert len(calls) == 3
    for i in (0, 1):
        _check_levels(calls[i], entry_rows, vanilla, i)
    # entering layer 2: rows matched against the sequence layer 2 would see without the second stage
    pre_only, pre_entering = _run_with_spy(q3, "divprune", 0.5, inputs)
    rows = entry_rows[_matched_rows(entering[2][0], pre_entering[2][0])]
    _check_levels(calls[2], rows, vanilla, 2)


def test_vision_stage_merges_keep_every_level_in_step(q3):
    """EvoPrune inside the ViT: each level reaches the LLM with one row per surviving token, none of them a
    unit merged away before its block (those are zeros at full length)."""
    inputs = q3.inputs()
    n_visual = int(_vanilla(q3, inputs)["mask"].sum())
    calls, entering = _run_with_spy(q3, "evoprune", 0.25, inputs)
    kept = round(0.25 * n_visual)
    assert len(calls) == 3
    for call in calls:
        assert int(call["mask"].sum()) == kept == call["embeds"].shape[0]
        assert bool((call["embeds"].abs().sum(-1) > 0).all())


def test_keep_one_installs_nothing_and_patch_is_undone(q3):
    lm = q3.seams.language_model
    with install(q3.seams, resolve_method("fastv"), keep=0.5):
        assert "_deepstack_process" in vars(lm)
    assert "_deepstack_process" not in vars(lm)
    with install(q3.seams, resolve_method("fastv"), keep=1.0):
        assert "_deepstack_process" not in vars(lm)
