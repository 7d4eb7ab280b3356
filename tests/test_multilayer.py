"""Multi-layer intra-LLM pruning (stages/llm.py IntraLLM with MethodSpec.intra), PyramidDrop and
SparseVLM against independent references: the recomputed rows against eager attention and a per-head
loop, the schedules against brute-force searches, the rankings against pure-Python loops, and KV-cached
decoding after several pruning stages against a full recompute."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from prunebench.errors import UserError
from prunebench.methods import METHODS, SelectContext, resolve_method
from prunebench.methods.base import (
    Insertion,
    IntraSchedule,
    MethodSpec,
    Positions,
    ResolvedMethod,
    Stage,
    layer_average,
    n_keep_for,
)
from prunebench.methods.pdrop import pdrop_counts, pdrop_layers, stage_counts
from prunebench.methods.sparsevlm_ops import (
    TABLES,
    dpc_knn_merge,
    rater_scores,
    recycled_count,
    scaled_table,
    select_raters,
    sparsevlm_counts,
)
from prunebench.stages import install

GEN = dict(max_new_tokens=5, do_sample=False, min_new_tokens=5)


# -- a suffix-free multi-layer method: the infrastructure's decode contract ---------------

def _norm_rank(ctx: SelectContext) -> torch.Tensor:
    """Keep the visual tokens with the largest hidden-state norm (depends on the prefix only)."""
    return ctx.tokens.float().norm(dim=-1).topk(ctx.n_keep, dim=-1).indices.sort(dim=-1).values


def _three_stages(n_layers: int, stages: list[int], n_in: int, n_keep: int) -> list[int]:
    return [min(n_in, 3 * n_keep), min(n_in, 2 * n_keep), n_keep]


NORM3 = MethodSpec(name="norm3", stage=Stage.INTRA_LLM, source="test", fn=_norm_rank,
                   intra=IntraSchedule(layers=lambda n_layers: [1, 2, 3], counts=_three_stages))


def _norm_rank_and_mean(ctx: SelectContext) -> Insertion:
    """As _norm_rank, plus two inserted tokens: the mean of the dropped ones and its negative."""
    kept = _norm_rank(ctx)
    dropped = torch.ones(ctx.tokens.shape[:2], dtype=torch.bool).scatter(1, kept, False)
    mean = (ctx.tokens * dropped[..., None]).sum(1) / dropped.sum(1, keepdim=True)
    return Insertion(kept, torch.stack([mean, -mean], dim=1))


NORM3_INSERT = dataclasses.replace(NORM3, fn=_norm_rank_and_mean,
                                   intra=dataclasses.replace(NORM3.intra, extra=lambda n_before, n_kept: 2))


def _layer_lengths(seams, fn) -> list[int]:
    seen: dict[int, int] = {}

    def hook(i: int):
        def pre(module, args, kwargs) -> None:
            seen.setdefault(i, (args[0] if args else kwargs["hidden_states"]).shape[1])

        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(seams.decoder_layers)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in sorted(seen)]


@pytest.mark.parametrize("insert", [False, True])
@pytest.mark.parametrize("positions", [Positions.ORIGINAL, Positions.CONTIGUOUS])
def test_multistage_cached_decode_matches_full_recompute(fam, positions, insert):
    """Three stages at layers 1, 2, 3 (with or without inserted tokens): per-layer lengths follow the
    schedule, and KV-cached greedy decoding equals recomputing the whole sequence every step."""
    from test_contract import _uncached_greedy

    method = ResolvedMethod(spec=NORM3_INSERT if insert else NORM3, params={}, positions=positions)
    inputs = fam.inputs()
    full, n_in = inputs["input_ids"].shape[1], fam.n_visual(inputs)
    with install(fam.seams, method, keep=0.2, seed=0) as inst:
        with torch.no_grad():
            lengths = _layer_lengths(fam.seams, lambda: fam.model(**inputs))
            out = fam.model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
        ids, logits = _uncached_greedy(fam.model, inputs, GEN["max_new_tokens"], inst)
    n_keep = max(1, math.floor(0.2 * n_in + 0.5))
    counts = method.spec.intra_plan(4, n_in, n_keep, {})
    counts = [n for _, n in counts]
    assert counts == [n + 2 * insert for n in _three_stages(4, [1, 2, 3], n_in, n_keep)]
    assert lengths == [full] + [full - n_in + n for n in counts]
    assert inst.counts.schedule == list(zip([1, 2, 3], counts, strict=True))
    assert inst.counts.layer_avg == pytest.approx((n_in + sum(counts)) / 4)
    assert inst.counts.n_visual_out == counts[-1]
    assert torch.equal(out.sequences, ids)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, atol=1e-4, rtol=1e-4)


def test_later_stage_keeps_a_subset_of_the_earlier_one(tiny):
    inputs = tiny.inputs()
    kept = []

    def spy(ctx):
        kept.append(ctx.tokens.shape[1])
        return _norm_rank(ctx)

    method = ResolvedMethod(spec=dataclasses.replace(NORM3, fn=spy), params={}, positions=Positions.ORIGINAL)
    with install(tiny.seams, method, keep=0.2, seed=0) as inst, torch.no_grad():
        tiny.model(**inputs)
    n_keep = max(1, math.floor(0.2 * tiny.n_visual(inputs) + 0.5))
    assert kept == [tiny.n_visual(inputs), 3 * n_keep, 2 * n_keep]  # each stage ranks the survivors only
    index = inst.state.intra_stages
    for earlier, later in itertools.pairwise(index):
        assert bool(torch.isin(later.index, earlier.index).all())


def test_bad_stage_layers_are_refused(tiny):
    with pytest.raises(UserError, match="increasing"):
        with install(tiny.seams, resolve_method("pdrop", {"layers": [2, 1]}), keep=0.5):
            pass
    with pytest.raises(UserError, match="layers must be"):
        with install(tiny.seams, resolve_method("pdrop", {"layers": [1, 9]}), keep=0.5):
            pass


# -- PyramidDrop -----------------------------------------------------------------------------

def test_pdrop_layers_scale_the_paper_split():
    assert pdrop_layers(32) == [8, 16, 24]
    assert pdrop_layers(4) == [1, 2, 3]
    assert pdrop_layers(28) == [7, 14, 21]


def test_pdrop_paper_default_is_lambda_half():
    """N=576, L=32, lambda=0.5: (8*576 + 8*288 + 8*144 + 8*72)/32 = 270 (METHODS.md)."""
    assert pdrop_counts(32, [8, 16, 24], 576, 270) == [288, 144, 72]


@pytest.mark.parametrize(("n_layers", "layers", "n_in", "n_keep"),
                         [(32, [8, 16, 24], 576, 64), (32, [8, 16, 24], 576, 192), (4, [1, 2, 3], 36, 10),
                          (28, [7, 14, 21], 400, 100), (4, [1, 2, 3], 36, 36)])
def test_pdrop_lambda_is_the_closest_on_a_grid(n_layers, layers, n_in, n_keep):
    """The solved schedule's layer average is as close to n_keep as any lambda on a fine grid."""
    got = layer_average(n_layers, n_in, list(zip(layers, pdrop_counts(n_layers, layers, n_in, n_keep), strict=True)))
    best = min(abs(layer_average(n_layers, n_in, list(zip(layers, stage_counts(n_in, 3, i / 20000), strict=True)))
                   - n_keep) for i in range(20001))
    assert abs(got - n_keep) <= best + 1e-9


def _naive_own_row(layer, hidden: torch.Tensor, positions: torch.Tensor, rotary) -> torch.Tensor:
    """Layer's last-token attention row by a loop over heads, transformers' own RoPE: [L]."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)[0]  # [L, D]
    q = attn.q_proj(x).view(x.shape[0], -1, attn.head_dim).transpose(0, 1)  # [H, L, d]
    k = attn.k_proj(x).view(x.shape[0], -1, attn.head_dim).transpose(0, 1)
    cos, sin = rotary(hidden, position_ids=positions)
    q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
    q, k = q[0], k[0].repeat_interleave(q.shape[1] // k.shape[1], dim=0)
    rows = []
    for h in range(q.shape[0]):
        logits = torch.stack([q[h, -1] @ k[h, j] for j in range(k.shape[1])]) / math.sqrt(attn.head_dim)
        rows.append(logits.softmax(-1))
    return torch.stack(rows).mean(0)


def test_pdrop_rows_equal_eager_attention_and_a_head_loop(tiny, tiny_path):
    """Stage 1's row equals eager attention of layer K_1 (1e-5); every stage's row equals a per-head loop
    over the hidden states entering it at its contiguous positions; the kept set is its top-n."""
    from conftest import load_tiny

    eager = load_tiny(tiny_path, attn="eager")
    inputs = eager.inputs()
    with torch.no_grad():
        attentions = eager.model(**inputs, output_attentions=True).attentions
    method = resolve_method("pdrop")
    layers = method.spec.intra_layers(4, method.params)
    seen, entering = [], {}

    def spy(ctx, **params):
        seen.append((ctx.signals["layer_last_query_attention"][0].clone(), ctx.n_keep))
        return METHODS.get("pdrop").fn(ctx, **params)

    def grab(i):
        def pre(module, args, kwargs):
            entering.setdefault(i, (args[0] if args else kwargs["hidden_states"]).detach().clone())
        return pre

    spied = dataclasses.replace(method, spec=dataclasses.replace(method.spec, fn=spy))
    seams = tiny.seams
    handles = [seams.decoder_layers[k].register_forward_pre_hook(grab(k), with_kwargs=True) for k in layers]
    try:
        with install(seams, spied, keep=0.6, seed=0) as inst, torch.no_grad():  # all three stages drop
            tiny.model(**inputs)
    finally:
        for h in handles:
            h.remove()
    image = torch.isin(inputs["input_ids"][0], torch.tensor(seams.image_token_ids))
    expected = attentions[layers[0]][0, :, -1].float().mean(0)[image]
    torch.testing.assert_close(seen[0][0], expected, atol=1e-5, rtol=0)
    assert len(seen) == len(layers)
    image_rows = image.nonzero()[:, 0]
    for s, k in enumerate(layers):
        hidden = entering[k]  # before this stage's drop: stage s-1's sequence
        rows = image_rows if s == 0 else _surviving_visual_rows(inst.state.intra_stages[s - 1].index[0], image_rows)
        with torch.no_grad():
            row = _naive_own_row(seams.decoder_layers[k], hidden, torch.arange(hidden.shape[1])[None],
                                 seams.language_model.rotary_emb)
        torch.testing.assert_close(seen[s][0], row[rows].float(), atol=1e-5, rtol=0)
        top = sorted(sorted(range(len(rows)), key=lambda i: -float(seen[s][0][i]))[: seen[s][1]])
        before = inst.state.intra_stages[s - 1].index[0] if s else torch.arange(image.numel())
        kept = torch.isin(before[rows], inst.state.intra_stages[s].index[0])
        assert kept.nonzero()[:, 0].tolist() == top


def _surviving_visual_rows(index: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
    """Rows, in the compacted sequence `index`, of the original visual rows that survive."""
    return torch.isin(index, image_rows).nonzero()[:, 0]


# -- SparseVLM -----------------------------------------------------------------------------

def test_raters_match_a_loop():
    g = torch.Generator().manual_seed(0)
    visual, text = torch.randn(2, 7, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    got = select_raters(visual, text)
    for b in range(2):
        m = [sum(math.exp(float(visual[b, i] @ text[b, t]))
                 / sum(math.exp(float(visual[b, i] @ text[b, u])) for u in range(6)) for i in range(7)) / 7
             for t in range(6)]
        assert got[b].tolist() == [x > sum(m) / 6 for x in m]


@pytest.mark.parametrize("v2", [False, True])
def test_rater_scores_match_a_loop(v2):
    g = torch.Generator().manual_seed(1)
    b, h, t, n = 2, 5, 4, 6
    attention = torch.rand(b, h, t, n, generator=g)
    raters = torch.tensor([[True, False, True, True], [False, True, False, False]])
    prior = torch.rand(b, t, n, generator=g) + 0.5 if v2 else None
    top = 3 if v2 else None
    got = rater_scores(attention, raters, prior, top)
    for bb in range(b):
        a = [[[float(attention[bb, hh, tt, j]) / (float(prior[bb, tt, j]) if v2 else 1.0) for j in range(n)]
              for tt in range(t)] for hh in range(h)]
        rs = [tt for tt in range(t) if raters[bb, tt]]
        heads = range(h)
        if v2:
            mass = [sum(a[hh][tt][j] for tt in rs for j in range(n)) for hh in range(h)]
            heads = sorted(range(h), key=lambda hh: -mass[hh])[:top]
        want = [sum(sum(a[hh][tt][j] for hh in heads) / len(heads) for tt in rs) / len(rs) for j in range(n)]
        torch.testing.assert_close(got[bb], torch.tensor(want), atol=1e-6, rtol=1e-6)


def test_sparsevlm_official_tables_and_scaling():
    for version, table in TABLES.items():
        for budget, counts in table.items():
            assert sparsevlm_counts(32, [3, 7, 16], 576, budget, version) == list(counts)
    # other budgets: the nearest table scaled; as close to n_keep as any scale on a fine grid
    for n_layers, stages, n_in, n_keep, version in [(4, [1, 2, 3], 36, 9, "1.5"), (32, [3, 7, 16], 576, 100, "2.0"),
                                                    (28, [3, 6, 14], 300, 30, "1.5")]:
        got = sparsevlm_counts(n_layers, stages, n_in, n_keep, version)
        avg = layer_average(n_layers, n_in, list(zip(stages, got, strict=True)))
        reference = TABLES[version][min(TABLES[version], key=lambda x: abs(x - n_keep * 576 / n_in))]
        best = min(abs(layer_average(n_layers, n_in, list(zip(stages, scaled_table(reference, n_in, i / 500),
                                                                  strict=True))) - n_keep) for i in range(10001))
        assert abs(avg - n_keep) <= best + 1e-9
        assert got == sorted(got, reverse=True) and 1 <= got[-1] and got[0] <= n_in


def test_sparsevlm_positions_follow_the_version():
    assert resolve_method("sparsevlm").positions is Positions.CONTIGUOUS
    assert resolve_method("sparsevlm", {"version": "2.0"}).positions is Positions.ORIGINAL
    with pytest.raises(UserError, match="1.5, 2.0"):
        resolve_method("sparsevlm", {"version": "3"}).spec.intra_plan(4, 36, 9, {"version": "3", "layers": None})


@pytest.mark.parametrize("version", ["1.5", "2.0"])
def test_sparsevlm_rater_rows_equal_eager_attention(tiny, tiny_path, version):
    """Stage 1 (rating layer l = K_1 - 1): the rater rows equal eager attention rows of layer l (1e-5);
    the raters equal a loop over the input embeddings; the kept set is the top-k of a loop's scores."""
    from conftest import load_tiny

    eager = load_tiny(tiny_path, attn="eager")
    inputs = eager.inputs()
    with torch.no_grad():
        out = eager.model(**inputs, output_attentions=True, output_hidden_states=True)
    method = resolve_method("sparsevlm", {"version": version})
    k1 = method.spec.intra_layers(4, method.params)[0]
    seen = []

    def spy(ctx, **params):
        seen.append(({k: v.clone() for k, v in ctx.signals.items()}, ctx.n_keep))
        return METHODS.get("sparsevlm").fn(ctx, **params)

    spied = dataclasses.replace(method, spec=dataclasses.replace(method.spec, fn=spy))
    with install(tiny.seams, spied, keep=0.25, seed=0) as inst, torch.no_grad():
        tiny.model(**inputs)
    ids = inputs["input_ids"][0]
    image = torch.isin(ids, torch.tensor(tiny.seams.image_token_ids))
    last = int(image.nonzero()[-1, 0])
    text = torch.arange(last + 1, ids.numel())
    expected = out.attentions[k1 - 1][0][:, text][:, :, image].float()  # [H, T, N]
    signals, n_keep = seen[0]
    torch.testing.assert_close(signals["rater_attention"][0], expected, atol=1e-5, rtol=0)
    embeds = out.hidden_states[0][0]
    assert signals["raters"][0].tolist() == select_raters(embeds[image][None], embeds[text][None])[0].tolist()
    # the naive score and its top-k
    heads = range(expected.shape[0])
    a = expected
    if version == "2.0":
        a = a / signals["rope_prior"][0][None]
        rs = signals["raters"][0]
        mass = [float(a[h][rs].sum()) for h in heads]
        heads = sorted(heads, key=lambda h: -mass[h])[:14]
    rs = signals["raters"][0].nonzero()[:, 0].tolist()
    score = [sum(float(a[h, t, j]) for h in heads for t in rs) / (len(heads) * len(rs)) for j in range(a.shape[2])]
    top = sorted(sorted(range(len(score)), key=lambda j: -score[j])[:n_keep])
    image_rows = image.nonzero()[:, 0]
    kept = inst.state.intra_stages[0].index[0]
    assert torch.isin(image_rows, kept).nonzero()[:, 0].tolist() == top


def test_rope_prior_matches_a_loop(tiny):
    from prunebench.stages.attention import rope_prior

    length, d = 9, 8
    rotary = tiny.seams.language_model.rotary_emb
    cfg_d = rotary.inv_freq.numel() * 2
    cos, sin = rotary(torch.zeros(1, length, cfg_d), position_ids=torch.arange(length)[None])
    rows, cols = torch.tensor([[7, 8]]), torch.tensor([[1, 2, 3]])
    got = rope_prior(cos, sin, rows, cols, scale=0.5, apply_rope=tiny.seams.apply_rope)
    ones, half = torch.ones(cfg_d), cfg_d // 2
    rotated_ones = torch.cat([-ones[half:], ones[:half]])
    for r, i in enumerate(rows[0].tolist()):
        for c, j in enumerate(cols[0].tolist()):
            qi = ones * cos[0, i] + rotated_ones * sin[0, i]
            kj = ones * cos[0, j] + rotated_ones * sin[0, j]
            assert float(got[0, r, c]) == pytest.approx(float(qi @ kj) * 0.5, abs=1e-5)
    del d


def _naive_dpc_knn(x: torch.Tensor, k: int, noise: torch.Tensor) -> torch.Tensor:
    """utils.py cluster_and_merge written as loops over tokens: x [M, C], noise [M] -> [k, C]."""
    m, c = x.shape
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(c) for j in range(m)] for i in range(m)]
    rho = [math.exp(-sum(v * v for v in sorted(dist[i])[:k]) / k) + float(noise[i]) for i in range(m)]
    far = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(m) if rho[j] > rho[i]] or [far]) for i in range(m)]
    centres = sorted(range(m), key=lambda i: -delta[i] * rho[i])[:k]
    members = {c_: [] for c_ in range(k)}
    for i in range(m):
        members[centres.index(i) if i in centres else min(range(k), key=lambda c_: dist[centres[c_]][i])].append(i)
    return torch.stack([sum(x[i] for i in members[c_]) / (len(members[c_]) + 1e-6) for c_ in range(k)])


@pytest.mark.parametrize(("m", "k"), [(1, 1), (7, 1), (12, 2), (31, 4)])
def test_dpc_knn_merge_matches_a_loop(m, k):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(2, m, 5, generator=g)
    noise = torch.rand(2, m, generator=g) * 1e-6
    got = dpc_knn_merge(x, k, noise)
    for b in range(2):
        torch.testing.assert_close(got[b], _naive_dpc_knn(x[b], k, noise[b]), atol=1e-5, rtol=1e-5)


def test_recycled_tokens_are_inserted_after_the_kept_ones(tiny):
    """v1.5: each stage that drops inserts int((int(0.3 * dropped) + 1) / 10) + 1 clusters right after
    its last kept visual token; the record counts them."""
    inputs = tiny.inputs()
    method = resolve_method("sparsevlm")
    n_in = tiny.n_visual(inputs)
    with install(tiny.seams, method, keep=0.5, seed=0) as inst, torch.no_grad():
        tiny.model(**inputs)
    plan = method.spec.intra_plan(4, n_in, n_keep_for(0.5, n_in)[0], method.params)
    selects = method.spec.intra_selects(4, n_in, n_keep_for(0.5, n_in)[0], method.params)
    assert inst.counts.schedule == plan
    before = n_in
    for (k, total), select, c in zip(plan, selects, inst.state.intra_stages, strict=True):
        kept = min(select, before)
        assert total == kept + (recycled_count(before, kept) if kept < before else 0)
        new = int(c.inserted[0].sum())  # this stage's clusters, plus earlier ones it kept
        dropping = list(_dropping_stages(n_in, selects, k, plan))
        assert recycled_count(*dropping[-1]) <= new <= sum(recycled_count(b, s) for b, s in dropping)
        before = total
    ids = inputs["input_ids"][0]
    image = torch.isin(ids, torch.tensor(tiny.seams.image_token_ids))
    first = inst.state.intra_stages[0]
    new = first.inserted[0].nonzero()[:, 0]
    kept_visual = torch.isin(first.index[0], image.nonzero()[:, 0]) & ~first.inserted[0]
    after = int(kept_visual.nonzero()[-1, 0]) + 1
    assert new.tolist() == list(range(after, after + recycled_count(n_in, min(selects[0], n_in))))


def _dropping_stages(n_in: int, selects: list[int], upto: int, plan: list[tuple[int, int]]):
    """(n_before, n_kept) of the stages up to layer `upto` that dropped tokens."""
    before = n_in
    for (k, total), select in zip(plan, selects, strict=True):
        if k > upto:
            break
        kept = min(select, before)
        if kept < before:
            yield before, kept
        before = total


def test_sparsevlm_v2_schedule_and_identity_on_every_family(fam):
    """v2.0 (not in the contract's default-parameter sweep): exact per-layer lengths, no recycling,
    original positions, keep=1.0 identical to the unpruned model."""
    method = resolve_method("sparsevlm", {"version": "2.0"})
    inputs = fam.inputs()
    full, n_in = inputs["input_ids"].shape[1], fam.n_visual(inputs)
    n_layers = len(fam.seams.decoder_layers)
    with torch.no_grad():
        ref = fam.model(**inputs).logits
    with install(fam.seams, method, keep=1.0, seed=0), torch.no_grad():
        assert torch.equal(fam.model(**inputs).logits, ref)
    plan = method.spec.intra_plan(n_layers, n_in, n_keep_for(0.3, n_in)[0], method.params)
    with install(fam.seams, method, keep=0.3, seed=0) as inst, torch.no_grad():
        lengths = _layer_lengths(fam.seams, lambda: fam.model(**inputs))
    bounds = [k for k, _ in plan] + [n_layers]
    expected = [full] * bounds[0]
    for (k, n), end in zip(plan, bounds[1:], strict=True):
        expected += [full - n_in + n] * (end - k)
    assert lengths == expected and inst.counts.schedule == plan
    assert inst.positions is Positions.ORIGINAL
    assert all(c is None or c.inserted is None for c in inst.state.intra_stages)


def test_runner_records_the_llm_schedule(tiny_path, tmp_path):
    """End to end: the record states each stage's visual count and the layer average they give."""
    from test_runner import config

    from prunebench import runner
    from prunebench.record import load_record

    rec = load_record(runner.run(config(tiny_path, tmp_path, "method=pdrop", "keep=0.5"), quiet=True))
    spec = METHODS.get("pdrop")
    plan = spec.intra_plan(4, 36, 18, dict(spec.defaults))
    assert rec.tokens["llm_schedule"] == [[k, n] for k, n in plan]
    assert rec.tokens["layer_avg"] == pytest.approx(layer_average(4, 36, plan))
    assert rec.tokens["n_visual_out"] == plan[-1][1] and rec.method_card["positions"] == "contiguous"


# -- MustDrop (LLM stages) -------------------------------------------------------------------

def test_mustdrop_layers_and_thresholds():
    from prunebench.methods.mustdrop import stage_layers, thresholds_for

    assert stage_layers(32) == [3, 7, 11, 15]
    assert stage_layers(4) == [1, 2, 3]  # [0, 1, 1, 2] without the repeat
    assert stage_layers(28) == [3, 6, 10, 13]
    assert thresholds_for(64 / 576, None, None) == (0.011, 0.01)
    assert thresholds_for(0.25, None, None) == (0.0012, 0.001)  # 144 is nearest 128
    assert thresholds_for(192 / 576, None, None) == (0.001, 0.001)
    assert thresholds_for(1.0, 0.5, 0.5) == (0.0, 0.0)
    assert thresholds_for(0.1, 0.2, None) == (0.2, 0.01)
    with pytest.raises(UserError, match=r"in \[0, 1\]"):
        thresholds_for(0.1, 2.0, None)


def test_dual_attention_filter_matches_a_loop():
    from prunebench.methods.mustdrop import dual_attention_keep

    g = torch.Generator().manual_seed(3)
    attention = torch.rand(3, 5, 12, generator=g) ** 4
    for gt, it in [(0.05, 0.3), (0.1, 0.05), (0.0, 1.0), (1.0, 1.0)]:
        got = dual_attention_keep(attention, gt, it)
        for b in range(3):
            s = [sum(float(attention[b, t, j]) for t in range(5)) for j in range(12)]
            drop = [s[j] < sum(s) * gt and max(float(attention[b, t, j]) for t in range(5)) < it for j in range(12)]
            want = [not d for d in drop]
            if not any(want):
                want[max(range(12), key=lambda j: s[j])] = True
            assert got[b].tolist() == want


def test_mustdrop_keeps_the_dual_filter_of_eager_rows(tiny, tiny_path):
    """Stage 1: the kept set is the loop's dual filter on eager attention rows of layer K_1 - 1."""
    from conftest import load_tiny

    eager = load_tiny(tiny_path, attn="eager")
    inputs = eager.inputs()
    n = eager.n_visual(inputs)
    with torch.no_grad():
        attentions = eager.model(**inputs, output_attentions=True).attentions
    # the LLM stages alone (the vision stages and their key set: tests/test_mustdrop.py)
    method = resolve_method("mustdrop", {"global_thr": 1.0 / n, "individual_thr": 1.0, "vision_stages": False})
    k1 = method.spec.intra_layers(4, method.params)[0]
    with install(tiny.seams, method, keep=0.5, seed=0) as inst, torch.no_grad():
        tiny.model(**inputs)
    ids = inputs["input_ids"][0]
    image = torch.isin(ids, torch.tensor(tiny.seams.image_token_ids))
    text = torch.arange(int(image.nonzero()[-1, 0]) + 1, ids.numel())
    rows = attentions[k1 - 1][0][:, text][:, :, image].float().mean(0)  # [T, N]
    s = rows.sum(0).tolist()
    want = [j for j in range(n) if not (s[j] < sum(s) / n and float(rows[:, j].max()) < 1.0)]
    assert 0 < len(want) < n
    kept = torch.isin(image.nonzero()[:, 0], inst.state.intra_stages[0].index[0]).nonzero()[:, 0].tolist()
    assert kept == want


def test_mustdrop_prefill_schedule_and_final_cache(fam):
    """Per-layer lengths follow the recorded schedule; after prefill the caches of layers K_1-1 and on
    hold only the final set, layer K_1-1's kept columns being the unpruned model's; decoding runs on it."""
    inputs = fam.inputs()
    full, n = inputs["input_ids"].shape[1], fam.n_visual(inputs)
    # the LLM stages alone (the vision stages and their key set: tests/test_mustdrop.py)
    method = resolve_method("mustdrop", {"global_thr": 1.0 / n, "individual_thr": 1.0, "vision_stages": False})
    layers = method.spec.intra_layers(len(fam.seams.decoder_layers), method.params)
    with torch.no_grad():
        vanilla = fam.model(**inputs, use_cache=True).past_key_values
        vanilla_keys = [layer.keys.clone() for layer in vanilla.layers]
    with install(fam.seams, method, keep=0.5, seed=0) as inst, torch.no_grad():
        lengths = _layer_lengths(fam.seams, lambda: fam.model(**inputs))
        cache = fam.model(**inputs, use_cache=True).past_key_values
        final = inst.state.intra_stages[-1]
        first = fam.model.generate(**inputs, **GEN)
        second = fam.model.generate(**inputs, **GEN)
    schedule = inst.counts.schedule
    assert [k for k, _ in schedule] == layers and schedule[0][1] < n
    bounds = [k for k, _ in schedule] + [len(lengths)]
    expected = [full] * bounds[0]
    for (k, kept), end in zip(schedule, bounds[1:], strict=True):
        expected += [full - n + kept] * (end - k)
    assert lengths == expected
    final_len = full - n + schedule[-1][1]
    assert [layer.keys.shape[-2] for layer in cache.layers] == [full] * (layers[0] - 1) + [final_len] * (
        len(lengths) - layers[0] + 1)
    k = layers[0] - 1
    torch.testing.assert_close(cache.layers[k].keys, vanilla_keys[k][:, :, final.index[0]], atol=0, rtol=0)
    assert torch.equal(first, second) and first.shape[1] == full + GEN["max_new_tokens"]


def test_pdrop_budget_unreachable_at_default_layers() -> None:
    """Issue 13: 32 layers, [8, 16, 24], 576 tokens: the floor is 144.75; 128 is flagged, 192 is not; the
    card's layer sets reach their targets."""
    from prunebench.methods.base import METHODS, layer_average
    from prunebench.methods.pdrop import pdrop_counts

    spec = METHODS.get("pdrop")
    flag = spec.unreachable_budget(32, 576, 128, {"layers": None})
    assert flag is not None and flag.startswith("budget unreachable:") and "144.75" in flag
    assert spec.unreachable_budget(32, 576, 192, {"layers": None}) is None
    for layers, target in (([5, 10, 15], 192), ([2, 4, 6], 128), ([1, 2, 3], 64)):
        assert spec.unreachable_budget(32, 576, target, {"layers": layers}) is None
        avg = layer_average(32, 576, list(zip(layers, pdrop_counts(32, layers, 576, target), strict=True)))
        assert abs(avg - target) < 1
    sparse = METHODS.get("sparsevlm")
    assert sparse.unreachable_budget(32, 576, 29, sparse.defaults).startswith("budget unreachable:")
    assert sparse.unreachable_budget(32, 576, 64, sparse.defaults) is None


def test_install_flags_an_unreachable_pdrop_budget(tiny):
    """The installation's `flags` carries the line once the stage sees its tokens; a reachable keep has none."""
    inputs = tiny.inputs()
    n_layers, n_in = len(tiny.seams.decoder_layers), tiny.n_visual(inputs)
    method = resolve_method("pdrop", {"layers": [n_layers - 1]})
    for keep, flagged in ((0.05, True), (1.0, False)):
        with install(tiny.seams, method, keep=keep, seed=0) as inst, torch.no_grad():
            tiny.model(**inputs)
        want = method.spec.unreachable_budget(n_layers, n_in, n_keep_for(keep, n_in)[0], method.params)
        assert (want is not None) is flagged
        assert inst.flags == ([want] if flagged else [])
