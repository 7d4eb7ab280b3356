"""The merge core shared by the token-merging methods (EvoPrune, ToMe, MustDrop) and the encoder drivers.
No model code here.

- `layer_schedule`: how many tokens to merge at each encoder layer (EvoPrune Algorithm 1, Appendix A.1;
  ToMe's constant r is its `mean` strategy).
- `merge_pairs`: merge source tokens into destinations by size-weighted mean (ToMe `merge_wavg`).
- `merge_units`: one merge decision applied to whole units of rows (Qwen 2x2 merge units, InternVL
  pixel-shuffle groups).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import torch

# ----------------------------------------------------------------------------------------------
# Layer schedule (evoprune.txt §3.2, Algorithm 1, Appendix A.1)
# ----------------------------------------------------------------------------------------------

VALID_STRATEGIES = (
    "mean, skip, first[N], last[N], increasing[a], decreasing[a] "
    "(N: integer 1..n_layers, default ceil(n_layers/2); a: number >= 0, default 1.0)"
)
_STRATEGY_RE = re.compile(r"^\s*(mean|skip|first|last|increasing|decreasing)\s*(?:\[\s*([^\]]*?)\s*\])?\s*$")

# Where a vision merge acts in an encoder layer: between attention and MLP (ToMe), or between layers
MERGE_POINTS = ("attention", "layer")


def _bad_strategy(strategy: str, why: str) -> ValueError:
    return ValueError(f"bad EvoPrune layer strategy {strategy!r} ({why}); valid forms: {VALID_STRATEGIES}")


def _strategy_weights(strategy: str, n_layers: int) -> list[float]:
    """Relative merge budget of each layer, Appendix A.1 (first/last/increasing/decreasing as written
    there; `skip` = every other layer starting at layer 0)."""
    m = _STRATEGY_RE.match(strategy.lower())
    if m is None:
        raise _bad_strategy(strategy, "unrecognised")
    name, arg = m.group(1), m.group(2)
    if name in ("mean", "skip"):
        if arg is not None:
            raise _bad_strategy(strategy, f"'{name}' takes no parameter")
        return [1.0 if name == "mean" or layer % 2 == 0 else 0.0 for layer in range(n_layers)]
    if name in ("first", "last"):
        try:
            n = math.ceil(n_layers / 2) if arg in (None, "") else int(arg)
        except ValueError:
            raise _bad_strategy(strategy, "N must be an integer") from None
        if not 1 <= n <= n_layers:
            raise _bad_strategy(strategy, f"N={n} outside 1..n_layers={n_layers}")
        on = range(n) if name == "first" else range(n_layers - n, n_layers)
        return [1.0 if layer in on else 0.0 for layer in range(n_layers)]
    try:
        a = 1.0 if arg in (None, "") else float(arg)
    except ValueError:
        raise _bad_strategy(strategy, "a must be a number") from None
    if not (math.isfinite(a) and a >= 0):
        raise _bad_strategy(strategy, f"a={a} must be finite and >= 0")
    if name == "increasing":
        return [float(layer + 1) ** a for layer in range(n_layers)]
    return [float(n_layers - layer) ** a for layer in range(n_layers)]


def _apportion(weights: list[float], total: int) -> list[int]:
    """Largest-remainder rounding of total*w/sum(w), exact (Fractions); ties go to the earlier layer."""
    wsum = sum(Fraction(w) for w in weights)
    quotas = [Fraction(total) * Fraction(w) / wsum for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda layer: (-(quotas[layer] - counts[layer]), layer))
    for layer in order[: total - sum(counts)]:
        counts[layer] += 1
    return counts


def _tokens_entering(r: list[int], n_tokens: int) -> list[int]:
    """T_l: tokens entering layer l (T_0 = n_tokens, T_{l+1} = T_l - r_l)."""
    t, out = n_tokens, []
    for r_l in r:
        out.append(t)
        t -= r_l
    return out


def max_mergeable(n_tokens: int, n_layers: int) -> int:
    """Most tokens n_layers bipartite steps can merge: each step at most floor(T/2) (§3.3)."""
    t = n_tokens
    for _ in range(n_layers):
        t -= t // 2
    return n_tokens - t


def _nearest_with_slack(candidates: list[int], slack: list[int], scheduled: list[bool]) -> int | None:
    """First candidate (ordered nearest-first) with slack, preferring scheduled layers."""
    for want_scheduled in (True, False):
        for layer in candidates:
            if slack[layer] > 0 and (scheduled[layer] or not want_scheduled):
                return layer
    return None


def _repair_capacity(r: list[int], n_tokens: int) -> list[int] | None:
    """Move budget off layers with r_l > floor(T_l/2) until every layer is within capacity.

    The excess goes to the nearest EARLIER layer with slack (scheduled layers first, then any). Only if
    no earlier layer has slack does it go to the nearest later one (our extension: the literal rule
    would give up although the total capacity suffices, e.g. first[1] with R > T/2). None = stuck.
    """
    r = list(r)
    scheduled = [r_l > 0 for r_l in r]
    for _ in range(4 * len(r) * (sum(r) + 1)):  # each move shifts >= 1 token; generous guard
        t = _tokens_entering(r, n_tokens)
        bad = next((layer for layer, (r_l, t_l) in enumerate(zip(r, t, strict=True)) if r_l > t_l // 2), None)
        if bad is None:
            return r
        # Earlier donee m: T_bad drops by the moved amount too, so moving e fixes `bad` iff
        # 2(r - e) <= T - e, i.e. e >= 2r - T; m itself can take floor(T_m/2) - r_m more.
        slack = [t_l // 2 - r_l for t_l, r_l in zip(t, r, strict=True)]
        m = _nearest_with_slack(list(range(bad - 1, -1, -1)), slack, scheduled)
        need = 2 * r[bad] - t[bad]
        if m is None:
            # Later donee k: T_k grows by the moved amount, so k can take T_k - 2 r_k more.
            slack = [t_l - 2 * r_l for t_l, r_l in zip(t, r, strict=True)]
            m = _nearest_with_slack(list(range(bad + 1, len(r))), slack, scheduled)
            need = r[bad] - t[bad] // 2
            if m is None:
                return None
        move = min(need, slack[m])
        r[bad] -= move
        r[m] += move
    return None


def layer_schedule(strategy: str, n_layers: int, n_tokens: int, n_remove: int) -> list[int]:
    """Tokens merged at each of `n_layers` encoder layers; sums to exactly `n_remove`.

    Layers 0..n_layers-1 are the layers that feed the selected features. Strategy strings
    (Appendix A.1): mean, skip, first[N], last[N], increasing[a] (weight ∝ (l+1)^a),
    decreasing[a] (weight ∝ (n_layers-l)^a). Integer counts by largest remainder, ties to the
    earlier layer. A nominal schedule within every layer's capacity r_l <= floor(T_l/2) is returned
    unchanged; otherwise the excess is moved as in `_repair_capacity`.

    Raises ValueError for a bad strategy string or when n_layers bipartite steps cannot merge
    n_remove of n_tokens tokens.
    """
    if n_layers < 1 or n_tokens < 0 or n_remove < 0:
        raise ValueError(
            f"need n_layers >= 1, n_tokens >= 0, n_remove >= 0; got {n_layers}, {n_tokens}, {n_remove}"
        )
    weights = _strategy_weights(strategy, n_layers)
    capacity = max_mergeable(n_tokens, n_layers)
    if n_remove > capacity:
        raise ValueError(
            f"cannot merge n_remove={n_remove} of n_tokens={n_tokens} tokens over n_layers={n_layers} "
            f"layers: one bipartite step merges at most floor(T/2), so at most {capacity} in total"
        )
    if n_remove == 0:
        return [0] * n_layers
    repaired = _repair_capacity(_apportion(weights, n_remove), n_tokens)
    if repaired is None:  # not expected once the total capacity suffices; kept as a hard stop
        raise ValueError(
            f"no feasible {strategy!r} schedule for n_remove={n_remove}, n_tokens={n_tokens}, "
            f"n_layers={n_layers}"
        )
    return repaired


@dataclass(frozen=True)
class MergeResult:
    """One merge step: T tokens in, T - r out.

    x [B, T-r, D], size [B, T-r], rep [B, T-r]: surviving tokens, sorted by rep.
    old_to_new [B, T] long: new index of each old token (merged tokens: the token they merged into).
    merged [B, T] bool: old tokens merged away. protected [B, T] bool: protected set actually used.
    """

    x: torch.Tensor
    size: torch.Tensor
    rep: torch.Tensor
    old_to_new: torch.Tensor
    merged: torch.Tensor
    protected: torch.Tensor


def merge_pairs(x: torch.Tensor, size: torch.Tensor, rep: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                protected: torch.Tensor) -> MergeResult:
    """Merge tokens src [B, r] into dst [B, r] (old indices; several src may share a dst) by size-weighted
    mean (ToMe `merge_wavg`), in float32; untouched tokens keep their exact values. Survivors are sorted
    by rep; x [B, T, D], size [B, T], rep [B, T]; protected [B, T] is only reported."""
    b, t, dim = x.shape
    n = t - src.shape[1]
    merged = torch.zeros(b, t, dtype=torch.bool, device=x.device).scatter_(1, src, True)
    keep = rep.masked_fill(merged, torch.iinfo(rep.dtype).max).sort(dim=-1, stable=True).indices[:, :n]
    new_index = torch.arange(n, device=x.device).expand(b, n)
    old_to_new = torch.full((b, t), -1, device=x.device).scatter_(1, keep, new_index)
    dst_new = old_to_new.gather(1, dst)
    old_to_new.scatter_(1, src, dst_new)  # merged src tokens point at their dst's new index

    sf = size.float()
    src_size, kept_size = sf.gather(1, src), sf.gather(1, keep)
    size_out = kept_size.scatter_add(1, dst_new, src_size)  # ToMe: size = merge(size)

    # Only the r sources and their destinations are touched (ToMe's merge_wavg weights and divides the whole
    # tensor): kept rows are copied once, in x's dtype; each distinct destination becomes (x*size + its
    # sources' x*size, added in src order) / its new size, in float32. Flat row indices: index_select is the
    # fast CPU copy (gather with an expanded index is ~6x slower). float64 is rounded to float32 first.
    row = torch.arange(b, device=x.device)[:, None]
    fits = torch.promote_types(x.dtype, torch.float32) == torch.float32  # float32 holds x exactly
    flat = (x if fits else x.float()).reshape(b * t, dim)
    out = flat.index_select(0, (keep + row * t).view(-1))  # [B*(T-r), D]
    at, slot = torch.unique(dst_new + row * n, return_inverse=True)  # distinct destinations in out
    acc = out.index_select(0, at).float() * kept_size.view(-1).index_select(0, at)[:, None]
    sources = flat.index_select(0, (src + row * t).view(-1)).float() * src_size.view(-1, 1)
    acc.index_put_((slot.view(-1),), sources, accumulate=True)
    out.index_copy_(0, at, (acc / size_out.view(-1).index_select(0, at)[:, None]).to(out.dtype))
    return MergeResult(
        x=out.view(b, n, dim).to(x.dtype),
        size=size_out.to(size.dtype),
        rep=rep.gather(1, keep),
        old_to_new=old_to_new,
        merged=merged,
        protected=protected,
    )


def merge_units(units: torch.Tensor, size: torch.Tensor, old_to_new: torch.Tensor,
                merged: torch.Tensor) -> torch.Tensor:
    """Apply one merge decision to whole units: [U, m, D] rows per unit -> [U', m, D].

    size [U] (ToMe sizes), old_to_new [U] (new index of each unit; a merged unit: the unit it merged
    into), merged [U] bool; survivors keep their order (new index = rank among survivors). A unit that
    received merges becomes the size-weighted mean of its sources row by row (row i with row i), in
    float32; untouched units keep their exact values.
    """
    n_out = int((~merged).sum())
    sf = size.float()
    num = units.new_zeros(n_out, *units.shape[1:], dtype=torch.float32)
    num.index_add_(0, old_to_new, units.float() * sf[:, None, None])
    den = sf.new_zeros(n_out).index_add_(0, old_to_new, sf)
    received = torch.zeros(n_out, dtype=torch.bool, device=units.device)
    received[old_to_new[merged]] = True
    return torch.where(received[:, None, None], (num / den[:, None, None]).to(units.dtype), units[~merged])
