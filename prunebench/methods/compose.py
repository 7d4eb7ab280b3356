"""`method=compose`: an ordered pipeline of stage methods, each with its own keep (UniPruneBench
Table 5's two-stage design, e.g. random_pre then fastv).

    method=compose method.params.stages=[{name: random_pre, keep: 0.333}, {name: fastv, keep: 0.333}]

A stage is ``{name, keep, params, positions}`` (only `name` is required). Its `keep` is the
fraction of the tokens *entering that stage* it keeps, so the overall fraction is the product of
the stage keeps (up to each stage's rounding). The top-level `keep` stays the overall fraction a
researcher sweeps: stages whose keep is null share it equally (keep=0.111 over two null stages:
0.333 each); when every stage gives its keep, the top-level keep must equal their product (to 3
decimals, the precision of the job folder name) or the run is refused. At most one stage per kind
(vision, pre-LLM, intra-LLM), in pipeline order; the stage hooks are in `stages/__init__.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prunebench.errors import UserError
from prunebench.methods.base import METHODS, MethodSpec, ResolvedMethod, Stage, resolve_method

ORDER = (Stage.VISION, Stage.PRE_LLM, Stage.INTRA_LLM)
STAGE_KEYS = ("name", "keep", "params", "positions")
TOLERANCE = 5e-4  # keep is written with 3 decimals in the job folder name


@dataclass(frozen=True)
class PlannedStage:
    method: ResolvedMethod
    keep: float

    def describe(self) -> dict[str, Any]:
        return {**self.method.describe(), "keep": self.keep}


def _stage_entry(i: int, entry: object) -> dict[str, Any]:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise UserError(f"compose: stage {i} must be a mapping with a 'name' (keys: {', '.join(STAGE_KEYS)})")
    unknown = set(entry) - set(STAGE_KEYS)
    if unknown:
        raise UserError(f"compose: stage {i} has unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                        f"valid: {', '.join(STAGE_KEYS)}")
    out = dict(entry)
    out["params"] = dict(out.get("params") or {})
    return out


def _resolve_stage(i: int, entry: dict[str, Any]) -> ResolvedMethod:
    name = str(entry["name"])
    method = resolve_method(name, dict(entry.get("params") or {}), entry.get("positions"))
    if method.stage not in ORDER:
        valid = ", ".join(n for n in METHODS.names() if METHODS.get(n).stage in ORDER)
        raise UserError(f"compose: stage {i} '{name}' is not a vision, pre-LLM or intra-LLM method; valid: {valid}")
    return method


def _check_order(methods: list[ResolvedMethod]) -> None:
    kinds = [m.stage for m in methods]
    if len(set(kinds)) != len(kinds) or kinds != sorted(kinds, key=ORDER.index):
        got = ", ".join(f"{m.name} ({m.stage.value})" for m in methods)
        raise UserError(f"compose: stages must be distinct and in order vision, pre_llm, intra_llm (at most one "
                        f"of each); got {got}")
    if kinds[:2] == [Stage.VISION, Stage.PRE_LLM]:
        raise UserError("compose: a vision stage followed by a pre-LLM stage is not supported yet; "
                        "valid pipelines: vision + intra_llm, pre_llm + intra_llm")


def _stage_keeps(entries: list[dict[str, Any]], keep: float) -> list[float]:
    given = [entry.get("keep") for entry in entries]
    for i, k in enumerate(given):
        if k is not None and not (isinstance(k, (int, float)) and 0.0 < float(k) <= 1.0):
            raise UserError(f"compose: stage {i} keep must be a fraction in (0, 1] or null, got {k}")
    fixed = math.prod(float(k) for k in given if k is not None)
    n_free = sum(k is None for k in given)
    if n_free == 0:
        if abs(fixed - keep) > TOLERANCE:
            raise UserError(f"compose: keep={keep:g} but the stage keeps multiply to {fixed:.3f}; set "
                            f"keep={fixed:.3f} or leave a stage's keep null to take the rest")
        return [float(k) for k in given]
    share = (keep / fixed) ** (1.0 / n_free)
    if share > 1.0 + 1e-9:
        raise UserError(f"compose: keep={keep:g} is more than the given stage keeps allow ({fixed:.3f})")
    return [float(k) if k is not None else min(share, 1.0) for k in given]


def plan_stages(stages: Sequence[object], keep: float) -> list[PlannedStage]:
    """The pipeline's stages in order, each with its resolved method and its own keep."""
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages:
        raise UserError("compose: params.stages must be a non-empty list of {name, keep, params, positions}")
    entries = [_stage_entry(i, e) for i, e in enumerate(stages)]
    methods = [_resolve_stage(i, e) for i, e in enumerate(entries)]
    _check_order(methods)
    return [PlannedStage(m, k) for m, k in zip(methods, _stage_keeps(entries, keep), strict=True)]


METHODS.add(
    "compose",
    MethodSpec(
        name="compose",
        stage=Stage.PIPELINE,
        source="UniPruneBench Table 5 (two-stage pruning: a pre-LLM then an intra-LLM method)",
        defaults={"stages": [{"name": "random_pre", "keep": None}, {"name": "fastv", "keep": None}]},
        dtype="each stage's own (its card under method_card.stages)",
        rounding="per stage, its own rounding of keep_s x the tokens entering it (round(keep_s*N_s), half up, "
        ">= 1); null stage keeps share keep geometrically",
        deviations=(
            "each stage's keep is a fraction of the tokens entering it (round-half-up, >= 1); the overall "
            "count is the chain of roundings, not round(keep * N)",
            "stages with keep null share the top-level keep equally (geometric mean)",
            "the LLM entry uses the earliest stage's position policy, layer K the intra-LLM stage's own",
        ),
    ),
)
