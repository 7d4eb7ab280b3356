"""The method registry. Importing this package registers every method.

Adding a method: write one module here with a pure tensor function decorated by
`@register_method(...)`, import it below, and add `configs/method/<name>.yaml`.
"""

from __future__ import annotations

from prunebench.methods import (  # noqa: F401  (registration)
    adaptive_mi,
    cdpruner,
    compose,
    dart,
    divprune,
    evoprune,
    fastervlm,
    fastv,
    fastv_alpha,
    fastv_reverse,
    fastv_vis,
    fastv_window,
    gprune,
    holov,
    mustdrop,
    pdrop,
    pooling_intra,
    pooling_pre,
    prumerge,
    random,
    sparsevlm,
    tome,
    vanilla,
    visionzip,
    vispruner,
    vtw,
)
from prunebench.methods.base import (
    METHODS,
    MethodSpec,
    Positions,
    ResolvedMethod,
    SelectContext,
    Stage,
    resolve_method,
)

__all__ = ["METHODS", "MethodSpec", "Positions", "ResolvedMethod", "SelectContext", "Stage", "resolve_method"]
