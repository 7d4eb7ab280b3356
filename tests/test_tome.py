"""ToMe fidelity: the merge step against a naive loop re-implementation of ToMe's
`bipartite_soft_matching` + `merge_wavg` (facebookresearch/ToMe tome/merge.py), conservation of the
size-weighted token sum, the metric (head-mean keys of the layer), and proportional attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prunebench.methods import resolve_method
from prunebench.methods.base import ResolvedMethod
from prunebench.methods.tome_ops import tome_merge
from prunebench.stages import install


def naive_tome(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, cls: bool) -> list[tuple[int, list[int], torch.Tensor, float]]:
    """One row, loops only, the paper's definition: a = even, b = odd, each a's best b by cosine,
    the r a's with the highest best-similarity merge into their b (size-weighted mean); [CLS] (index 0)
    never merges. Returns per surviving token: (index, sources, value, size), sorted by index."""
    t = x.shape[0]
    cos = [[float(torch.dot(metric[i], metric[j]) / (metric[i].norm() * metric[j].norm())) for j in range(t)]
           for i in range(t)]
    best = {}
    for i in range(0, t, 2):
        if cls and i == 0:
            continue
        j = max(range(1, t, 2), key=lambda j: (cos[i][j], -j))  # first max, as torch.max
        best[i] = (cos[i][j], j)
    chosen = sorted(best, key=lambda i: (-best[i][0], i))[:r]
    groups = {i: [i] for i in range(t) if i not in chosen}
    for i in chosen:
        groups[best[i][1]].append(i)
    out = []
    for i in sorted(groups):
        src = groups[i]
        total = sum(float(size[k]) for k in src)
        value = sum(x[k].double() * float(size[k]) for k in src) / total
        out.append((i, sorted(src), value, total))
    return out


@pytest.mark.parametrize(("t", "r", "cls"), [(9, 4, True), (10, 3, False), (12, 5, True), (7, 1, False)])
def test_merge_equals_naive_bipartite_soft_matching(t, r, cls):
    g = torch.Generator().manual_seed(t * 10 + r)
    x = torch.randn(2, t, 5, generator=g)
    metric = torch.randn(2, t, 3, generator=g)
    size = torch.randint(1, 4, (2, t), generator=g).float()
    rep = torch.arange(t).expand(2, t).clone()
    protect = torch.zeros(2, t, dtype=torch.bool)
    protect[:, 0] = cls
    out = tome_merge(x, size, rep, None, r, metric=metric, protect=protect)
    assert out.x.shape == (2, t - r, 5)
    for row in range(2):
        ref = naive_tome(x[row], size[row], metric[row], r, cls)
        assert out.rep[row].tolist() == [i for i, *_ in ref]
        for k, (_, src, value, total) in enumerate(ref):
            torch.testing.assert_close(out.x[row, k].double(), value, atol=1e-5, rtol=1e-5)
            assert float(out.size[row, k]) == total
            merged_into = (out.old_to_new[row] == k).nonzero()[:, 0].tolist()
            assert merged_into == src
        if cls:
            assert not out.merged[row, 0]


def test_merge_conserves_size_weighted_sum():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 17, 8, generator=g)
    metric = torch.randn(3, 17, 4, generator=g)
    size = torch.ones(3, 17)
    rep = torch.arange(17).expand(3, 17).clone()
    for r in (6, 4, 2):  # three successive layers
        out = tome_merge(x, size, rep, None, r, metric=metric)
        torch.testing.assert_close((out.x * out.size[..., None]).sum(1), (x * size[..., None]).sum(1))
        assert torch.equal(out.size.sum(1), size.sum(1))
        keep = ~out.merged
        metric = metric[keep].view(3, -1, 4)
        x, size, rep = out.x, out.size, out.rep
    assert torch.equal(size.sum(1), torch.full((3,), 17.0))


def test_merge_refuses_r_beyond_the_bipartite_capacity():
    x = torch.randn(1, 6, 2)
    protect = torch.tensor([[True, False, False, False, False, False]])
    with pytest.raises(ValueError, match="more than bipartite matching can merge"):
        tome_merge(x, torch.ones(1, 6), torch.arange(6)[None], None, 3, metric=x, protect=protect)


def test_metric_is_the_layers_head_mean_keys(tiny):
    """The metric handed to the merge step equals k_proj(layer_norm1(x)) averaged over heads, computed
    independently from the attention module's input."""
    seen, inputs_of_attn = [], []
    spec = resolve_method("tome").spec

    def spy(*args, **kwargs):
        seen.append(kwargs["metric"])
        return tome_merge(*args, **kwargs)

    method = ResolvedMethod(spec=dataclasses.replace(spec, merge=spy), params=dict(spec.defaults),
                            positions=spec.positions)
    layer = tiny.seams.vision_layers[0]
    hook = layer.self_attn.register_forward_hook(
        lambda m, a, kw, out: inputs_of_attn.append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True)
    try:
        with install(tiny.seams, method, keep=0.5, seed=0) as inst, torch.no_grad():
            tiny.model(**tiny.inputs())
    finally:
        hook.remove()
    assert inst.schedule[0] > 0 and len(seen) == sum(1 for r in inst.schedule if r)
    attn = layer.self_attn
    h = inputs_of_attn[0]
    expected = attn.k_proj(h).view(*h.shape[:2], -1, attn.head_dim).mean(2)
    torch.testing.assert_close(seen[0], expected)


def test_proportional_attention_changes_later_layers_only_when_on(tiny):
    inputs = tiny.inputs()
    outs = {}
    for prop in (True, False):
        with install(tiny.seams, resolve_method("tome", {"prop_attn": prop}), keep=0.4, seed=0), torch.no_grad():
            outs[prop] = tiny.model(**inputs).logits
    assert not torch.equal(outs[True], outs[False])


def test_proportional_attention_bias_is_log_size(tiny):
    """With prop_attn on, the layer after the first merge receives log(size) as its attention mask."""
    masks = []
    layers = tiny.seams.vision_layers
    hook = layers[1].self_attn.register_forward_pre_hook(
        lambda m, a, kw: masks.append(kw.get("attention_mask", a[1] if len(a) > 1 else None)), with_kwargs=True)
    try:
        with install(tiny.seams, resolve_method("tome"), keep=0.4, seed=0) as inst, torch.no_grad():
            tiny.model(**tiny.inputs())
            size = inst.state.vision.size
    finally:
        hook.remove()
    assert inst.schedule[0] > 0 and masks[0] is not None
    assert masks[0].shape[-1] == 1 + 36 - inst.schedule[0]
    assert float(masks[0].exp().sum()) == pytest.approx(37.0)  # sizes of the tokens at layer 1 sum to 1 + N
    assert size.sum() == 37


def test_prop_attn_noted_where_not_applied(fam):
    if fam.family not in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "internvl"):
        pytest.skip("proportional attention is applied on this family")
    with install(fam.seams, resolve_method("tome"), keep=0.5) as inst:
        pass
    assert any("proportional attention not applied" in n for n in inst.notes)
    with install(fam.seams, resolve_method("tome", {"prop_attn": False}), keep=0.5) as inst:
        pass
    assert not inst.notes or all("proportional" not in n for n in inst.notes)


def _official_pairs(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """facebookresearch/ToMe tome/merge.py bipartite_soft_matching, transcribed: the metric's own dtype."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    edge_idx = node_max.sort(dim=-1, descending=True, stable=True).indices[..., :r]
    return 2 * edge_idx, 2 * node_idx.gather(-1, edge_idx) + 1


def test_tome_scores_in_the_metric_dtype_by_default() -> None:
    """Issue 13: default score_dtype=model matches the official bf16 arithmetic; fp32 is the old upcast."""
    from prunebench.methods.tome_ops import bipartite_pairs

    differs = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        metric = torch.randn(1, 64, 16, generator=g).to(torch.bfloat16)
        ours = bipartite_pairs(metric, 12)
        assert all(torch.equal(o, e) for o, e in zip(ours, _official_pairs(metric, 12), strict=True))
        fp32 = bipartite_pairs(metric, 12, score_dtype="fp32")
        assert all(torch.equal(o, e) for o, e in zip(fp32, _official_pairs(metric.float(), 12), strict=True))
        differs += not torch.equal(ours[0].sort().values, fp32[0].sort().values)
    assert differs > 0
