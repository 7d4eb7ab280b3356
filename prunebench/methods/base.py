"""What a pruning method is: a pure tensor function plus the facts the harness needs about it.

A method knows no model class. The family adapter and the stage hooks (`prunebench.stages`)
hand it the visual tokens at its stage and the signals it asked for, and apply its decision.

Three kinds:
- *input* methods (before the processor): ``fn(tokens, low, high, n_keep) -> setting``, which setting of the
  family's resolution knob (`prunebench.families.resolution`) gives about n_keep visual tokens; the harness
  prepares the image with it before the processor runs (downsampling);
- *select* methods (pre-LLM, intra-LLM): ``fn(ctx, **params) -> LongTensor[B, k]``, the kept
  visual-token indices, sorted ascending; a pre-LLM method may instead return a `Selection`
  (indices plus new token values, e.g. pooled);
- *merge* methods (inside the vision encoder): a per-layer merge schedule plus a merge step
  applied between a layer's self-attention and its MLP (EvoPrune, ToMe-style).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from prunebench.checks import Kind, check_params
from prunebench.errors import UserError
from prunebench.registry import Registry


class Stage(str, Enum):
    NONE = "none"
    INPUT = "input"  # on the image before the processor (its resolution: fewer visual tokens born)
    VISION = "vision"  # inside the vision encoder
    PRE_LLM = "pre_llm"  # after the projector, before the LLM
    INTRA_LLM = "intra_llm"  # inside the LLM at layer K (or at an ordered list of layers)
    PIPELINE = "pipeline"  # several of the above in order (`method=compose`, methods/compose.py)


class Positions(str, Enum):
    """Position ids of the tokens that survive (METHODS.md §0.1)."""

    ORIGINAL = "original"  # kept tokens keep their original RoPE positions (gaps)
    CONTIGUOUS = "contiguous"  # the shortened sequence is renumbered 0..L'-1


# Signals an adapter can compute for a method, without eager attention or a second forward.
SIGNALS = {
    "last_query_attention": "[B, N] head-mean softmax row of the last prompt token at LLM layer K-1, "
    "restricted to the visual columns (recomputed from that layer's post-RoPE q/k)",
    "received_attention": "[B, T] mean attention each vision token receives at the current encoder layer "
    "(recomputed from that layer's q/k)",
    "last_visual_query_attention": "[B, N] head-mean softmax row of the last visual token at LLM layer K-1 "
    "(causal: keys up to it), restricted to the visual columns (recomputed from that layer's post-RoPE q/k)",
    "last_token_hidden": "[B, D] hidden state of the last prompt token entering LLM layer K",
    "text_embeddings": "[B, M, D] LLM input embeddings of the prompt's text after the last visual token of the "
    "image's sequence (the question and the template's assistant prefix; padding excluded; all non-visual tokens "
    "when none follow the image); pre-LLM only: the selection then runs at the LLM entry, where the text is embedded",
    "layer_keys": "[B, L, Hkv*d] post-RoPE key states of every prompt row at LLM layer K-1, heads "
    "concatenated (k_proj output + that layer's rotary embeddings; no second forward)",
    "normed_hidden": "[B, L, D] hidden states of every prompt row entering LLM layer K, through the LLM's final norm",
    "visual_rows": "[B, N] sequence rows of the visual tokens at layer K (ascending)",
    "sequence_index": "[B, L] each row's index in its own prompt at layer K, padding not counted (the index a "
    "batch-1 official loop sees; padding rows get -1 or repeat a neighbour's)",
    "text_after_visual": "[B, L] bool: non-padding rows after the last visual token (the question, the "
    "generation prompt)",
    "cls_attention": "[N] per image (pre-LLM): head-mean softmax row of the vision encoder's [CLS] query over the "
    "patches at encoder layer `vision_layer` (method parameter; None = the selected feature layer), recomputed "
    "from that layer's q/k, aligned with the post-projector tokens (families without [CLS]: mean attention "
    "received, see stages/vision_signals.py)",
    "cls_keys": "[N, d] per image (pre-LLM): head-mean keys of the patches at the same encoder layer, aligned "
    "with the post-projector tokens",
    "cls_attention_full": "[N] per image (pre-LLM): as cls_attention but the layer's q/k read as ONE head over the full "
    "width, scale width^-1/2 (PruMerge's clip_encoder.py); Qwen: the cls_attention substitute",
    "cls_keys_full": "[N, C] per image (pre-LLM): the full-width keys of the patches at the same layer (PruMerge); "
    "Qwen: cls_keys",
    "vision_features": "[N, C] per image (pre-LLM): the projector's input per visual token (the vision features "
    "before the projector; InternVL/Qwen: the 2x2 group's concatenated features)",
    "keys": "[B, T, d] head-mean keys of the current encoder layer (its key projection output, before any "
    "rotary embedding), ToMe's merge metric; passed to the merge step as `metric`",
    "projector_input": "(pre-LLM) run the method on the projector input, the encoder feature space, where the family's "
    "projector rows allow it (`Seams.projector_rows`); tokens it returns are then projected",
    "layer_last_query_attention": "[B, N] head-mean softmax row of the last prompt token at LLM layer K itself: "
    "K's input_layernorm + q/k projections of the hidden states entering K, RoPE at the current positions "
    "(PyramidDrop's inference path; no second forward of the layer)",
    "rater_attention": "[B, H, T, N] per-head causal softmax rows of the T text tokens after the last visual token "
    "at LLM layer K-1, restricted to the visual columns (recomputed from that layer's post-RoPE q/k)",
    "raters": "[B, T] bool: SparseVLM's text raters among those T tokens, chosen on the LLM input embeddings",
    "rope_prior": "[B, T, N] RoPE-only logits (q = k = 1, rotated, scaled) between those text rows and the visual "
    "columns at layer K-1 (SparseVLM+ normalisation)",
"key_set": "[B, N] bool: the surviving visual tokens a vision-encoder stage of the method protects from "
    "dropping (MustDrop's key set: top ceil(0.08 M) of the M patches by last-layer [CLS] attention, after its "
    "window merge); all False when that stage did not run",
    "grid": "the visual tokens form an h x w grid (ctx.grid); families whose tokens are packed refuse the method",
}


@dataclass
class SelectContext:
    """Input of a select method.

    tokens: [B, N, D] visual tokens at the method's stage (post-projector features pre-LLM;
        LLM hidden states entering layer K intra-LLM).
    n_keep: how many to keep (>= 1).
    grid: (h, w) of the visual tokens when they form a grid, else None.
    generator: seeded RNG for stochastic methods.
    signals: the signals the method declared in `needs`, by name.
    keep: the run's keep fraction (adaptive methods map it to their thresholds).
    """

    tokens: torch.Tensor
    n_keep: int
    grid: tuple[int, int] | None
    generator: torch.Generator
    signals: Mapping[str, torch.Tensor] = field(default_factory=dict)
    keep: float = 1.0


@dataclass(frozen=True)
class Selection:
    """What a select method returns when it also changes the kept tokens (pooling, merging):
    index [B, k] sorted (where each output token sits among the N inputs: its representative) and
    tokens [B, k, D] (the new values). A plain select method returns just the index tensor.
    groups [B, N] (optional, for the record's `kept.merged_into`, never for the computation): for each input
    token, the input index of the output token it went into (a kept token: its own), -1 when it was dropped
    without being merged."""

    index: torch.Tensor
    tokens: torch.Tensor
    groups: torch.Tensor | None = None


@dataclass(frozen=True)
class IntraSchedule:
    """Where a multi-layer intra-LLM method prunes and how many visual tokens each stage keeps.

    layers(n_layers, **params) -> [K_1 < K_2 < ...] in 1..n_layers-1: stage s prunes entering layer K_s;
    counts(n_layers, stages, n_in, n_keep, **params) -> [n_1 >= n_2 >= ...]: visual tokens kept from
    layer K_s on, for n_in visual tokens entering the LLM and the budget n_keep = round(keep * n_in);
    None: an adaptive budget (the method decides each stage's count, e.g. MustDrop's thresholds).
    final_cache: after prefill, the KV caches of layers K_1-1 .. K_S-1 keep only the final visual set,
    so every decode step from layer K_1-1 on attends to it (MustDrop's decoding stage).
    """

    layers: Callable[..., list[int]]
    counts: Callable[..., list[int]] | None
    # extra(n_before, n_kept, **params) -> tokens a stage adds after its kept ones (SparseVLM v1.5's
    # recycled clusters), when it dropped some; they are visual tokens and count as kept.
    extra: Callable[..., int] | None = None
    final_cache: bool = False


@dataclass(frozen=True)
class Insertion:
    """What an intra-LLM stage returns when it also adds tokens: index [B, k] the kept visual tokens
    (sorted) and extra [B, m, D] new visual tokens, inserted right after the last kept visual token."""

    index: torch.Tensor
    extra: torch.Tensor


@dataclass(frozen=True)
class MethodSpec:
    name: str
    stage: Stage
    source: str  # paper section / official file the implementation follows
    fn: Callable[..., Any] | None = None  # select: fn(ctx, **params) -> [B, k]; input: see the module docstring
    schedule: Callable[..., list[int]] | None = None  # merge: per-layer merge counts
    merge: Callable[..., Any] | None = None  # merge: one merge step (see stages/vision.py)
    needs: frozenset[str] = frozenset()
    positions: Positions = Positions.CONTIGUOUS
    defaults: Mapping[str, Any] = field(default_factory=dict)
    deviations: tuple[str, ...] = ()
    # The documented number of visual tokens the method keeps for n_in candidates when the budget
    # is n_keep = round(keep * n_in), given its hyper-parameters: budget(n_in, n_keep, **params).
    # None means exactly n_keep. E.g. DART keeps 4 + 8 * ((n_keep - 4) // 8) (image pivots + per-pivot quota).
    budget: Callable[..., int] | None = None
    # Intra-LLM methods whose operating point is a layer, not a token count (VTW withdraws every
    # visual token): layer_for_keep(keep, n_layers, **params) -> K in 0..n_layers (K = n_layers
    # withdraws nothing). None means K = params["layer"] and a per-token budget n_keep.
    layer_for_keep: Callable[..., int] | None = None
    # Intra-LLM methods pruning at several layers; None = one stage at params["layer"] keeping kept_count.
    intra: IntraSchedule | None = None
    # The official position policy when it depends on a hyper-parameter (SparseVLM v1.5 vs v2.0).
    positions_for: Callable[..., Positions] | None = None
    # An intra-LLM method's own vision-encoder stage, installed with it (MustDrop's window merge and key set):
    # the name of a handler in `prunebench.stages.VISION_STAGES`; vision_stage_on(keep, **params) says whether
    # it acts in this run (None: whenever keep < 1).
    vision_stage: str | None = None
    vision_stage_on: Callable[..., bool] | None = None
    # The card's arithmetic dtype of the scoring and the budget rounding, one line each: required of every
    # registered method (issue 13; tests/test_contract.py checks the registry)
    dtype: str = ""
    rounding: str = ""
    # Why the selection costs more than twice the N x N cosine matrix at some size (scripts/bench_selection.py);
    # "" where it never does
    cost: str = ""
    # What a parameter accepts beyond its default's type (a string's choices, a number's range), checked when
    # the method is resolved, before anything loads
    kinds: Mapping[str, Kind] = field(default_factory=dict)

    def runs_vision_stage(self, keep: float, params: Mapping[str, Any]) -> bool:
        if self.vision_stage is None:
            return False
        return keep < 1.0 if self.vision_stage_on is None else bool(self.vision_stage_on(keep, **params))

    def default_positions(self, params: Mapping[str, Any]) -> Positions:
        return self.positions if self.positions_for is None else self.positions_for(**params)

    def kept_count(self, n_in: int, n_keep: int, params: Mapping[str, Any]) -> int:
        return n_keep if self.budget is None else int(self.budget(n_in, n_keep, **params))

    def intra_layers(self, n_layers: int, params: Mapping[str, Any], keep: float = 1.0) -> list[int]:
        """The decoder layers an intra-LLM method prunes at, in order (none: a layer-from-keep method
        whose operating point K = n_layers withdraws nothing)."""
        if self.layer_for_keep is not None:
            k = int(self.layer_for_keep(keep, n_layers, **params))
            return [] if k == n_layers else [k]
        if self.intra is None:
            return [int(params["layer"])]
        return [int(k) for k in self.intra.layers(n_layers, **params)]

    def unreachable_budget(self, n_layers: int, n_in: int, n_keep: int, params: Mapping[str, Any]) -> str | None:
        """A multi-layer method with a per-stage schedule cannot go below keeping one token per stage from
        its first layer on: when the requested layer average n_keep is below that floor, the message
        (starting `budget unreachable:`); else None (METHODS.md §0.2)."""
        if self.intra is None or self.intra.counts is None or self.layer_for_keep is not None:
            return None
        layers = self.intra_layers(n_layers, params)
        floor = layer_average(n_layers, n_in, self.intra_plan(n_layers, n_in, n_keep, params,
                                                              selects=[1] * len(layers)))
        if n_keep >= floor:
            return None
        return (f"budget unreachable: {self.name} at layers {layers} of {n_layers} keeps a layer average of at "
                f"least {floor:.2f} visual tokens of {n_in}; requested {n_keep}")

    @property
    def adaptive(self) -> bool:
        """A multi-layer method whose per-stage counts follow from thresholds, not from keep."""
        return self.intra is not None and self.intra.counts is None

    def intra_selects(self, n_layers: int, n_in: int, n_keep: int, params: Mapping[str, Any],
                      keep: float = 1.0) -> list[int]:
        """Tokens each stage selects among its survivors (before any extra tokens it adds)."""
        if self.intra is None:
            return [self.kept_count(n_in, n_keep, params)] * len(self.intra_layers(n_layers, params, keep))
        layers = self.intra_layers(n_layers, params)
        if self.intra.counts is None:  # adaptive: each stage decides; n_in is an upper bound
            return [n_in] * len(layers)
        return [int(c) for c in self.intra.counts(n_layers, layers, n_in, n_keep, **params)]

    def intra_plan(self, n_layers: int, n_in: int, n_keep: int, params: Mapping[str, Any],
                   keep: float = 1.0, selects: list[int] | None = None) -> list[tuple[int, int]]:
        """The documented schedule [(K_s, visual tokens from layer K_s on, extra tokens included), ...]
        (for an adaptive method: the upper bound n_in per stage; keep: for layer-from-keep methods;
        selects: `intra_selects` when the caller has it already)."""
        layers = self.intra_layers(n_layers, params, keep)
        if selects is None:
            selects = self.intra_selects(n_layers, n_in, n_keep, params, keep)
        plan, current = [], n_in
        for k, select in zip(layers, selects, strict=True):
            kept = min(select, current) if self.intra is not None else select
            extra = self.intra.extra if self.intra is not None else None
            if extra is not None and kept < current:
                kept += int(extra(current, kept, **params))
            plan.append((k, kept))
            current = kept
        return plan

    @property
    def kind(self) -> str:
        if self.stage is Stage.NONE:
            return "none"
        if self.stage is Stage.PIPELINE:
            return "pipeline"
        if self.stage is Stage.INPUT:
            return "input"
        return "merge" if self.merge is not None else "select"


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(
    name: str,
    *,
    stage: Stage,
    source: str,
    needs: tuple[str, ...] = (),
    positions: Positions = Positions.CONTIGUOUS,
    defaults: Mapping[str, Any] | None = None,
    deviations: tuple[str, ...] = (),
    budget: Callable[..., int] | None = None,
    layer_for_keep: Callable[..., int] | None = None,
    intra: IntraSchedule | None = None,
    positions_for: Callable[..., Positions] | None = None,
    vision_stage: str | None = None,
    vision_stage_on: Callable[..., bool] | None = None,
    dtype: str = "",
    rounding: str = "",
    kinds: Mapping[str, Kind] | None = None,
    cost: str = "",
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a select method: ``@register_method("fastv", stage=Stage.INTRA_LLM, ...)``."""
    unknown = set(needs) - set(SIGNALS)
    if unknown:
        raise ValueError(f"method {name} needs unknown signals {sorted(unknown)}")
    if "text_embeddings" in needs and stage is not Stage.PRE_LLM:  # only the LLM entry provides the text
        raise ValueError(f"method {name}: the text_embeddings signal is provided to pre-LLM methods only")

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        METHODS.add(
            name,
            MethodSpec(
                name=name, stage=stage, source=source, fn=fn, needs=frozenset(needs), positions=positions,
                defaults=dict(defaults or {}), deviations=deviations, budget=budget,
                layer_for_keep=layer_for_keep, intra=intra, positions_for=positions_for,
                vision_stage=vision_stage, vision_stage_on=vision_stage_on, dtype=dtype, rounding=rounding,
                kinds=dict(kinds or {}), cost=cost,
            ),
        )
        return fn

    return wrap


@dataclass(frozen=True)
class ResolvedMethod:
    """A method with its hyper-parameters and position policy fixed for one run."""

    spec: MethodSpec
    params: Mapping[str, Any]
    positions: Positions

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def stage(self) -> Stage:
        return self.spec.stage

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "stage": self.spec.stage.value,
            "params": dict(self.params),
            "positions": self.positions.value,
            "needs": sorted(self.spec.needs),
            "source": self.spec.source,
            "deviations": list(self.spec.deviations),
            **({"dtype": self.spec.dtype} if self.spec.dtype else {}),
            **({"budget_rounding": self.spec.rounding} if self.spec.rounding else {}),
            **({"cost": self.spec.cost} if self.spec.cost else {}),
        }


def resolve_method(name: str, params: Mapping[str, Any] | None = None, positions: str | None = None) -> ResolvedMethod:
    """Look a method up and check its hyper-parameters against the documented defaults."""
    spec = METHODS.get(name)
    params = dict(params or {})
    unknown = set(params) - set(spec.defaults)
    if unknown:
        valid = ", ".join(sorted(spec.defaults)) or "none"
        raise UserError(f"method '{name}' has no parameter(s) {', '.join(sorted(unknown))}; valid: {valid}")
    try:
        check_params("method", params, spec.defaults, prefix="method.params", declared=spec.kinds)
    except UserError as err:
        raise UserError(f"{name}: {err}") from None
    merged = {**spec.defaults, **params}
    try:
        pos = Positions(positions) if positions else spec.default_positions(merged)
    except ValueError:
        raise UserError(
            f"position policy '{positions}' is not one of: {', '.join(p.value for p in Positions)}"
        ) from None
    return ResolvedMethod(spec=spec, params=merged, positions=pos)


def layer_average(n_layers: int, n_in: int, plan: list[tuple[int, int]]) -> float:
    """Visual tokens per decoder layer, averaged over the n_layers layers: layers before K_1 see n_in,
    layers K_s..K_{s+1}-1 see n_s (METHODS.md §0.2)."""
    bounds = [k for k, _ in plan] + [n_layers]
    total = plan[0][0] * n_in + sum((bounds[i + 1] - k) * n for i, (k, n) in enumerate(plan))
    return total / n_layers


def top_k_sorted(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """[..., N] -> [..., k] indices of the k largest (or smallest) scores, ascending (original order).
    Ties go to the lower index, on every device (`topk` leaves them to the kernel)."""
    order = scores.sort(dim=-1, descending=largest, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def n_keep_for(keep: float, n_in: int) -> tuple[int, bool]:
    """Tokens kept for a keep fraction: round-half-up of keep*n_in, at least 1.

    Returns (n_keep, clamped) where clamped says the rounding would have left 0 tokens.
    """
    if not 0.0 < keep <= 1.0:
        raise UserError(f"keep must be a fraction in (0, 1], got {keep}")
    n = math.floor(keep * n_in + 0.5)
    return (max(n, 1), n < 1)
