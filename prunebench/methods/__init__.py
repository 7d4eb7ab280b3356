"""The method registry. Importing this package registers every method.

Adding a method: write one module here with a pure tensor function decorated by
`@register_method(...)` and add `configs/method/<name>.yaml`; every module of this package is imported below.
"""

from __future__ import annotations

import importlib
import pkgutil

from prunebench.methods.base import (
    METHODS,
    MethodSpec,
    Positions,
    ResolvedMethod,
    SelectContext,
    Stage,
    resolve_method,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):  # registration: each module's decorators
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHODS", "MethodSpec", "Positions", "ResolvedMethod", "SelectContext", "Stage", "resolve_method"]
