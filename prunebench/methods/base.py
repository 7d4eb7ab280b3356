"""What a pruning method is: a pure tensor function plus the facts the harness needs about it.

A method knows no model class. The family adapter and the stage hooks (`prunebench.stages`)
hand it the visual tokens at its stage and the signals it asked for, and apply its decision.

Two kinds:
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

from prunebench.errors import UserError
from prunebench.registry import Registry


class Stage(str, Enum):
    NONE = "none"
    VISION = "vision"  # inside the vision encoder
    PRE_LLM = "pre_llm"  # after the projector, before the LLM
    INTRA_LLM = "intra_llm"  # inside the LLM at layer K
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
    """

    tokens: torch.Tensor
    n_keep: int
    grid: tuple[int, int] | None
    generator: torch.Generator
    signals: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Selection:
    """What a select method returns when it also changes the kept tokens (pooling, merging):
    index [B, k] sorted (where each output token sits among the N inputs: its representative) and
    tokens [B, k, D] (the new values). A plain select method returns just the index tensor."""

    index: torch.Tensor
    tokens: torch.Tensor


@dataclass(frozen=True)
class MethodSpec:
    name: str
    stage: Stage
    source: str  # paper section / official file the implementation follows
    fn: Callable[..., Any] | None = None  # select: fn(ctx, **params) -> [B, k]
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

    def kept_count(self, n_in: int, n_keep: int, params: Mapping[str, Any]) -> int:
        return n_keep if self.budget is None else int(self.budget(n_in, n_keep, **params))

    @property
    def kind(self) -> str:
        if self.stage is Stage.NONE:
            return "none"
        if self.stage is Stage.PIPELINE:
            return "pipeline"
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
                layer_for_keep=layer_for_keep,
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
        }


def resolve_method(name: str, params: Mapping[str, Any] | None = None, positions: str | None = None) -> ResolvedMethod:
    """Look a method up and check its hyper-parameters against the documented defaults."""
    spec = METHODS.get(name)
    params = dict(params or {})
    unknown = set(params) - set(spec.defaults)
    if unknown:
        valid = ", ".join(sorted(spec.defaults)) or "none"
        raise UserError(f"method '{name}' has no parameter(s) {', '.join(sorted(unknown))}; valid: {valid}")
    merged = {**spec.defaults, **params}
    try:
        pos = Positions(positions) if positions else spec.positions
    except ValueError:
        raise UserError(
            f"position policy '{positions}' is not one of: {', '.join(p.value for p in Positions)}"
        ) from None
    return ResolvedMethod(spec=spec, params=merged, positions=pos)


def n_keep_for(keep: float, n_in: int) -> tuple[int, bool]:
    """Tokens kept for a keep fraction: round-half-up of keep*n_in, at least 1.

    Returns (n_keep, clamped) where clamped says the rounding would have left 0 tokens.
    """
    if not 0.0 < keep <= 1.0:
        raise UserError(f"keep must be a fraction in (0, 1], got {keep}")
    n = math.floor(keep * n_in + 0.5)
    return (max(n, 1), n < 1)
