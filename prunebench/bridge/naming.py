"""model_name for VLMEvalKit: it reuses predictions by (work_dir, model_name, dataset), so the name
must change whenever anything that changes an answer changes (model, method, its params, keep, seed).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


def _slug(text: str) -> str:
    # VLMEvalKit joins model_name and dataset name with "_" in file names: keep "_" out of our parts
    return _UNSAFE.sub("-", text).strip("-") or "x"


def model_name(model: str, method: str, params: Mapping[str, Any], keep: float, seed: int,
               positions: str | None = None) -> str:
    """`<model>~<method>[-p<hash8>]~k0.111~s0`: stable, readable, a valid directory name.

    The params hash covers every parameter (defaults included) and the position policy, so two
    configurations that differ anywhere never share a name; equal configurations always do.
    """
    name = f"{_slug(model)}~{_slug(method)}"
    if params or positions:
        blob = json.dumps({"params": dict(params), "positions": positions}, sort_keys=True, default=str)
        name += "-p" + hashlib.sha1(blob.encode()).hexdigest()[:8]
    return f"{name}~k{keep:.3f}~s{int(seed)}"
