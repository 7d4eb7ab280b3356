"""The contract every registered method honours on every family and stage it supports:
keep=1.0 is the unpruned model, keep<1 keeps exactly the documented count, the model is
restored on exit, results are deterministic under a seed, and cached decoding agrees with a
full recompute (positions and masks are right after pruning)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from prunebench.errors import UserError
from prunebench.methods import METHODS, Stage, resolve_method
from prunebench.methods.base import n_keep_for
from prunebench.stages import batch_refusal, install
from prunebench.stages.vision_signals import VISION_SIGNALS

# Pipelines (`method=compose`) chain these; their contract is in tests/test_compose.py. Input-stage methods act
# on the images before the processor (`method=downsample`): the same contract in tests/test_downsample.py.
PRUNING = [n for n in METHODS.names() if METHODS.get(n).stage not in (Stage.NONE, Stage.PIPELINE, Stage.INPUT)]
GEN = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)


# Families whose visual tokens reach the LLM as one image's h x w grid (tiny setup): LLaVA-1.5 only.
# NeXT / OneVision pack base + tiles + newlines, Qwen and InternVL are dynamic-resolution.
INTRA_GRID_FAMILIES = {"llava"}
# Intra-LLM methods with their own vision-encoder stages (MustDrop's window merge + [CLS] key set) need one
# fixed patch grid behind [CLS], handed to the LLM as is: LLaVA-1.5 only.
OWN_VISION_STAGE_FAMILIES = {"llava"}


def needs_intra_grid(name: str) -> bool:
    spec = METHODS.get(name)
    return spec.stage is Stage.INTRA_LLM and "grid" in spec.needs


def supported(fam, name: str) -> bool:
    """Vision-stage merges need an encoder seam (a merging layer class, or a family-specific vision
    driver such as Qwen's 2x2-unit merges); intra-LLM grid methods need the visual tokens to form
    one grid inside the LLM; families without these refuse the method clearly."""
    seams = fam.seams
    if needs_intra_grid(name):
        return fam.family in INTRA_GRID_FAMILIES
    if METHODS.get(name).vision_stage is not None:
        return fam.family in OWN_VISION_STAGE_FAMILIES
    if VISION_SIGNALS & METHODS.get(name).needs:  # per-view encoder signals: every family (packed ones mapped)
        return True
    if "grid" in METHODS.get(name).needs:  # pre-LLM: per-image grids, but not packed tokens
        return seams.always_keep is None
    return (METHODS.get(name).stage is not Stage.VISION or seams.merge_layer_class is not None
            or seams.vision_driver is not None)


def require(fam, name: str) -> None:
    if METHODS.get(name).stage is Stage.VISION and fam.seams.vision_hand_on is not None:
        # families that hand merged tokens on through their own packing: per-view / per-frame
        # budgets, tested with their own expectations
        pytest.skip(f"vision-stage merges on {fam.family}: contract in tests/test_video.py, test_vision_next.py")
    if not supported(fam, name):
        why = "needs the visual tokens to form a grid: " if "grid" in METHODS.get(name).needs else ""
        with pytest.raises(UserError, match=f"{why}not supported on the {fam.seams.family} family"):
            with install(fam.seams, resolve_method(name), keep=0.5, seed=0):
                pass
        pytest.skip(f"{name} is refused on {fam.family} (checked)")


def prefill_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, **GEN)


def layer_lengths(fam, fn) -> list[int]:
    """Sequence length entering each decoder layer during the first (prefill) forward of fn()."""
    seen: dict[int, int] = {}

    def hook(i):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(i, hidden.shape[1])

        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(fam.seams.decoder_layers)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in range(len(seen))]


def fixed_tokens(fam, inputs) -> int:
    """Visual tokens a family keeps outside the budget (LLaVA-NeXT/OneVision row newlines) in row 0's
    image, counted on the model's own packed features."""
    if fam.seams.always_keep is None:
        return 0
    fn = fam.model.model.get_image_features
    params = inspect.signature(fn).parameters
    with torch.no_grad():
        packed = fn(**{k: v for k, v in inputs.items() if k in params}).pooler_output
    return int(fam.seams.always_keep(packed[0]).sum())  # row 0's image (one image per row)


def max_vision_merges(fam, n_in: int) -> int:
    """Bipartite merging halves the tokens at most once per feeding encoder layer."""
    n = n_in
    for _ in fam.seams.vision_layers:
        n -= n // 2
    return n_in - n


def hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# The contract at batch 1 and at batch 2 (the same sample in both rows: every row must get what row 0 gets;
# tests/test_batch.py checks rows that differ against each sample alone).
BATCHES = [1, 2]


def batchable(name: str, batch: int) -> None:
    if batch > 1 and batch_refusal(resolve_method(name)) is not None:
        pytest.skip(f"{name} runs at batch size 1 (refused in one line: tests/test_batch.py)")


def assert_rows_agree(inst, batch: int) -> None:
    """Every row of a batch of identical samples has row 0's counts."""
    assert len(inst.state.row_counts) == batch and all(c == inst.counts for c in inst.state.row_counts)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", PRUNING)
def test_keep_one_is_identical_to_vanilla(fam, name, batch):
    require(fam, name)
    batchable(name, batch)
    inputs = fam.inputs(batch=batch)
    ref_logits, ref_tokens = prefill_logits(fam.model, inputs), generate(fam.model, inputs)
    with install(fam.seams, resolve_method(name), keep=1.0, seed=0):
        logits, tokens = prefill_logits(fam.model, inputs), generate(fam.model, inputs)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("keep", [0.5, 0.111, 0.01])
@pytest.mark.parametrize("name", PRUNING)
def test_keep_gives_exact_documented_count(fam, name, keep, batch):
    require(fam, name)
    batchable(name, batch)
    method = resolve_method(name)
    inputs = fam.inputs(batch=batch)
    full = inputs["input_ids"].shape[1]
    n_in = fam.n_visual(inputs)
    fixed = fixed_tokens(fam, inputs) if method.stage is Stage.PRE_LLM else 0
    n_keep, clamped = n_keep_for(keep, n_in - fixed)
    assert n_keep == max(1, round(keep * (n_in - fixed)))
    plan = None
    if method.stage is Stage.INTRA_LLM:  # the documented schedule [(K_s, n_s)]: one stage, several, or none
        plan = method.spec.intra_plan(len(fam.seams.decoder_layers), n_in, n_keep, method.params, keep=keep)
        if method.spec.layer_for_keep is not None:  # VTW: an operating point, no per-token budget to clamp
            clamped = False
            k = intra_layer(method, keep, len(fam.seams.decoder_layers))
            assert plan == ([] if k == len(fam.seams.decoder_layers) else [(k, 0)])
    adaptive = method.spec.adaptive  # thresholds decide the counts: checked against what the record states
    clamped = clamped and not adaptive  # no per-token budget to clamp
    if plan is None:
        n_keep = method.spec.kept_count(n_in - fixed, n_keep, method.params) + fixed
    else:
        n_keep = plan[-1][1] if plan else n_in
    if method.stage is Stage.VISION and n_in - n_keep > max_vision_merges(fam, n_in):
        with pytest.raises(UserError, match="at most"):
            with install(fam.seams, method, keep=keep, seed=0):
                pass
        return
    with install(fam.seams, method, keep=keep, seed=0) as inst:
        lengths = layer_lengths(fam, lambda: prefill_logits(fam.model, inputs))
        tokens = generate(fam.model, inputs)
    n_entry = n_in  # visual tokens entering the LLM
    if adaptive:
        # a method's own vision stage (MustDrop's window merge) may shorten the LLM input adaptively: the
        # entry count the hooks measured, checked below against the measured layer lengths
        n_entry = inst.state.stage_counts["entry"].n_visual_out
        assert [k for k, _ in inst.counts.schedule] == [k for k, _ in plan]
        assert all(a >= b >= 1 for a, b in zip([n_in, n_entry] + [n for _, n in inst.counts.schedule],
                                               [n_entry] + [n for _, n in inst.counts.schedule], strict=False))
        plan = inst.counts.schedule
        n_keep = plan[-1][1]
    assert inst.counts.n_visual_in == n_in and inst.counts.n_visual_out == n_keep
    assert inst.counts.n_fixed == fixed
    assert_rows_agree(inst, batch)
    assert inst.counts.clamped == clamped
    pruned = full - n_in + n_keep
    if plan is not None:
        bounds = [k for k, _ in plan] + [len(lengths)]
        expected = [full - n_in + n_entry] * bounds[0]
        for (k, n), end in zip(plan, bounds[1:], strict=True):
            expected += [full - n_in + n] * (end - k)
        assert lengths == expected
        assert inst.counts.schedule == plan
        n_layers = len(lengths)
        assert inst.counts.layer_avg == pytest.approx(sum(expected) / n_layers - (full - n_in))
    else:
        assert lengths == [pruned] * len(lengths)
    assert tokens.shape[1] == full + GEN["max_new_tokens"]


def intra_layer(method, keep: float, n_layers: int) -> int | None:
    """The layer an intra-LLM method prunes at: its `layer`, or the one its keep maps to (VTW:
    round-half-up(keep*L), computed here independently of the method's own function)."""
    if method.stage is not Stage.INTRA_LLM:
        return None
    if method.spec.layer_for_keep is None or method.params.get("layer") is not None:
        return method.params["layer"]
    return int(keep * n_layers + 0.5)


@pytest.mark.parametrize("name", PRUNING)
def test_model_is_restored_after_removal(fam, fam_path, name):
    from conftest import load_tiny

    require(fam, name)
    fresh = load_tiny(fam_path, family=fam.family)  # a model nobody patched
    used = load_tiny(fam_path, family=fam.family)
    classes = [type(m) for m in used.model.modules()]
    inputs = used.inputs()
    generate(used.model, inputs)  # transformers installs its own output-capture hooks lazily
    hooks_before = hooks_left(used.model)
    with install(used.seams, resolve_method(name), keep=0.25, seed=0):
        generate(used.model, inputs)
        assert hooks_left(used.model) > hooks_before
    assert hooks_left(used.model) == hooks_before
    assert [type(m) for m in used.model.modules()] == classes
    assert not any(hasattr(m, "_pb_merge") for m in used.model.modules())
    assert torch.equal(prefill_logits(used.model, inputs), prefill_logits(fresh.model, inputs))
    assert torch.equal(generate(used.model, inputs), generate(fresh.model, inputs))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", PRUNING)
def test_deterministic_under_seed(fam, name, batch):
    require(fam, name)
    batchable(name, batch)
    inputs = fam.inputs(batch=batch)
    runs = []
    for _ in range(2):
        with install(fam.seams, resolve_method(name), keep=0.25, seed=7):
            runs.append((prefill_logits(fam.model, inputs)[:, -1], generate(fam.model, inputs)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_random_methods_depend_on_seed(fam):
    inputs = fam.inputs()
    kept = []
    for seed in (1, 2):
        with install(fam.seams, resolve_method("random_pre"), keep=0.25, seed=seed) as inst:
            prefill_logits(fam.model, inputs)
            kept.append(inst.state.entry.index.clone())
    assert not torch.equal(kept[0], kept[1])


def _uncached_greedy(model, inputs, steps: int, inst) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by recomputing the whole sequence every step (no KV cache)."""
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    ids, mask, logits = inputs["input_ids"], inputs["attention_mask"], []
    types = inputs.get("mm_token_type_ids")
    for _ in range(steps):
        inst.reseed(0)
        if types is not None:
            extra["mm_token_type_ids"] = torch.nn.functional.pad(types, (0, ids.shape[1] - types.shape[1]))
        with torch.no_grad():
            last = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1]
        logits.append(last)
        nxt = last.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids, torch.stack(logits, 1)


# Methods whose decision does not depend on the generated suffix (so a full recompute of the
# longer sequence makes the same decision), under both position policies. Signals read at the last
# token depend on it; the last VISUAL token's causal row (FastV_VIS) does not, so it stays in. The
# prompt's text after the image does too (text-conditioned pre-LLM methods, whose deferred selection is
# checked with a text-blind spy in tests/test_text_conditioned.py; DART's text pivots). PyramidDrop's
# own-layer last row, SparseVLM's raters and the text rows (SparseVLM, MustDrop) depend on it;
# multi-layer decode is checked with a suffix-free multi-layer method in tests/test_multilayer.py.
SUFFIX_SIGNALS = {"last_query_attention", "last_token_hidden", "text_embeddings", "text_after_visual",
                  "layer_last_query_attention", "raters", "rater_attention"}
SUFFIX_FREE = [(n, p) for n in PRUNING if SUFFIX_SIGNALS.isdisjoint(METHODS.get(n).needs)
               for p in ("original", "contiguous")]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("name", "positions"), SUFFIX_FREE)
def test_cached_decode_matches_full_recompute(fam, name, positions, batch):
    """KV-cached decode after pruning (masks, positions per policy) == recomputing from scratch."""
    require(fam, name)
    batchable(name, batch)
    inputs = fam.inputs(batch=batch)
    method = resolve_method(name, positions=positions)
    with install(fam.seams, method, keep=0.25, seed=0) as inst:
        inst.reseed(0)
        with torch.no_grad():
            out = fam.model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
        ids, logits = _uncached_greedy(fam.model, inputs, GEN["max_new_tokens"], inst)
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, atol=1e-4, rtol=1e-4)


def test_fastv_row_equals_eager_attention(fam, fam_path):
    """The recomputed last-query row at layer K-1 equals eager attention weights (1e-5)."""
    from conftest import load_tiny

    eager = load_tiny(fam_path, attn="eager", family=fam.family)
    inputs = eager.inputs()
    with torch.no_grad():
        out = eager.model(**inputs, output_attentions=True)
    fastv = resolve_method("fastv")
    k = fastv.params["layer"]
    image = torch.isin(inputs["input_ids"][0], torch.tensor(eager.seams.image_token_ids))
    expected = out.attentions[k - 1][0, :, -1].float().mean(0)[image]

    seen = {}

    def spy(ctx, **params):
        seen["row"] = ctx.signals["last_query_attention"]
        return METHODS.get("fastv").fn(ctx, **params)

    sdpa = load_tiny(fam_path, family=fam.family)
    spied = dataclasses.replace(fastv, spec=dataclasses.replace(fastv.spec, fn=spy))
    with install(sdpa.seams, spied, keep=0.25, seed=0):
        prefill_logits(sdpa.model, inputs)
    torch.testing.assert_close(seen["row"][0], expected, atol=1e-5, rtol=0)
    top = expected.topk(n_keep_for(0.25, expected.numel())[0]).indices.sort().values
    with install(sdpa.seams, fastv, keep=0.25, seed=0) as inst:
        prefill_logits(sdpa.model, inputs)
    kept_image_rows = inst.state.intra.index[0]
    image_rows = image.nonzero()[:, 0]
    assert torch.equal(kept_image_rows[torch.isin(kept_image_rows, image_rows)], image_rows[top])


# PruMerge(+) adaptive: the count per image follows from the data (IQR outliers), not from keep.
ADAPTIVE_PRUMERGE = ["prumerge", "prumerge_plus"]


def official_adaptive_kept(row: torch.Tensor, plus: bool) -> int:
    """Patches PruMerge(+) keeps adaptively for one image's [CLS] row, counted independently: numpy
    percentiles as the official `outlier_dectection`, at least 1; PruMerge+ adds the official grid
    arange(0, N - 1, int(int(1 / ratio) / 3)) minus the outliers already kept."""
    import numpy as np

    a = row.double().numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    top = np.argsort(-a, kind="stable")[: max(1, int((a > q3 + 1.5 * (q3 - q1)).sum()))]
    if not plus:
        return top.size
    grid = np.arange(0, a.size - 1, max(1, int(int(1 / (top.size / a.size)) / 3)))
    return top.size + int(np.isin(grid, top, invert=True).sum())


@pytest.mark.parametrize("name", ADAPTIVE_PRUMERGE)
def test_adaptive_prumerge_count_is_what_the_record_states(fam, name):
    """adaptive=true: keep=1.0 is the unpruned model; keep<1 keeps, per image, the independent IQR
    count (+ PruMerge+'s grid) + 1 aggregate token, which is what the record states and what every
    decoder layer sees."""
    method = resolve_method(name, {"adaptive": True})
    inputs = fam.inputs()
    ref_logits, ref_tokens = prefill_logits(fam.model, inputs), generate(fam.model, inputs)
    with install(fam.seams, method, keep=1.0, seed=0):
        assert torch.equal(prefill_logits(fam.model, inputs), ref_logits)
        assert torch.equal(generate(fam.model, inputs), ref_tokens)
    rows: list[torch.Tensor] = []

    def spy(ctx, **kw):
        rows.append(ctx.signals["cls_attention_full"][0].clone())
        return method.spec.fn(ctx, **kw)

    spied = dataclasses.replace(method, spec=dataclasses.replace(method.spec, fn=spy))
    full, n_in, fixed = inputs["input_ids"].shape[1], fam.n_visual(inputs), fixed_tokens(fam, inputs)
    with install(fam.seams, spied, keep=0.5, seed=0) as inst:
        lengths = layer_lengths(fam, lambda: prefill_logits(fam.model, inputs))
    expected = fixed + sum(official_adaptive_kept(r, name == "prumerge_plus") + 1 for r in rows)
    assert rows and inst.counts.n_visual_in == n_in and inst.counts.n_fixed == fixed
    assert inst.counts.n_visual_out == expected <= n_in
    assert lengths == [full - n_in + expected] * len(lengths)


def test_fidelity_deviations_declared() -> None:
    """Issue 13: EvoPrune's feasibility repair and the GQA extension of PDrop / SparseVLM are on their cards."""
    from prunebench.methods.base import METHODS

    assert any("_make_feasible" in d for d in METHODS.get("evoprune").deviations)
    for name in ("pdrop", "sparsevlm"):
        assert any("repeat_kv" in d for d in METHODS.get(name).deviations), name


@pytest.mark.parametrize("name", METHODS.names())
def test_card_declares_dtype_and_budget_rounding(name: str) -> None:
    """Issue 13: every registered method's card carries its arithmetic dtype and budget rounding."""
    from prunebench.methods.base import resolve_method

    card = resolve_method(name).describe()
    assert card["dtype"] and card["budget_rounding"]


@pytest.mark.parametrize("name", [n for n in METHODS.names() if METHODS.get(n).kinds])
def test_declared_kinds_accept_the_defaults_and_refuse_other_values(name: str) -> None:
    """A method's declared parameter kinds name real parameters, accept the documented defaults, and refuse
    a value outside them when the method is resolved (before anything loads)."""
    from prunebench.errors import UserError
    from prunebench.methods.base import resolve_method

    spec = METHODS.get(name)
    assert set(spec.kinds) <= set(spec.defaults)
    resolve_method(name, dict(spec.defaults))
    for key, kind in spec.kinds.items():
        bad = "not-a-choice" if kind.choices else (kind.low - 1 if kind.low is not None else None)
        with pytest.raises(UserError, match=rf"^{name}: method\.params\.{key} must be "):
            resolve_method(name, {key: bad})


@pytest.mark.parametrize("name", METHODS.names())
def test_method_yaml_states_the_card_defaults(name: str) -> None:
    """Issue 15: a method's defaults live on its card; `configs/method/<name>.yaml` states exactly them (a
    parameter missing from the YAML could not be overridden without Hydra's `+`)."""
    from prunebench.checks import yaml_defaults

    yaml = yaml_defaults("method", name)
    assert yaml.get("name") == name
    assert (yaml.get("params") or {}) == dict(METHODS.get(name).defaults)
    assert yaml.get("positions") is None  # null: the card's official policy
