"""VLMEvalKit's score table -> the record's main score (0-100), as each dataset YAML states it.

`dataset.evaluate` returns a dict (MME via d2df, OCRBench; Video-MME / LongVideoBench nested dicts of
"0.375"-style strings; MVBench `{task: [correct, total, "37.50%"]}`) or a DataFrame (POPE, MMBench:
one row per split); list entries are keyed by position, "37.50%" reads as 37.5, NaN (the mean of a
category absent from the set or subset) is left out. `flatten` makes either a flat `{"<split>|<column>": value}` dict (kept whole in the record);
`main_score` applies the YAML's `score:` mapping:

  key: Overall | sum: [perception, reasoning]   which entries (a key may omit its "<split>|" prefix
                                                 when exactly one split has that column)
  max: 2800          -> 100 * value / max       (MME: perception + cognition over their maximum)
  per_sample: 1      -> 100 * value / (per_sample * n_samples)   (OCRBench: final score over n points;
                                                 the full 1000-sample set gives final / 10)
  scale: 100         -> value * scale           (default 1; fractions to percent)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from prunebench.errors import UserError

MAPPING_KEYS = ("key", "sum", "max", "per_sample", "scale")


def _number(value: Any) -> float | None:
    if isinstance(value, str) and value.strip().endswith("%"):  # MVBench's "37.50%"
        value = value.strip()[:-1]
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out  # Video-MME's "nan": a category absent from the set


def flatten(table: Any) -> dict[str, float]:
    """dict / nested dict / DataFrame (optionally with a `split` column) -> flat numeric dict."""
    if hasattr(table, "to_dict") and hasattr(table, "columns"):
        rows = table.to_dict("records")
        out: dict[str, float] = {}
        for i, row in enumerate(rows):
            split = row.get("split")
            prefix = (f"{split}|" if split is not None else (f"{i}|" if len(rows) > 1 else ""))
            for col, value in row.items():
                num = _number(value)
                if col != "split" and num is not None:
                    out[f"{prefix}{col}"] = num
        return out
    if isinstance(table, Mapping):
        out = {}
        for key, value in table.items():
            if isinstance(value, Mapping) or hasattr(value, "columns"):
                out.update({f"{key}|{k}": v for k, v in flatten(value).items()})
            elif isinstance(value, (list, tuple)):  # MVBench: [correct, total, "percent%"]
                out.update({f"{key}|{i}": num for i, v in enumerate(value) if (num := _number(v)) is not None})
            elif (num := _number(value)) is not None:
                out[str(key)] = num
        return out
    raise TypeError(f"cannot read a VLMEvalKit score table of type {type(table).__name__}")


def lookup(flat: Mapping[str, float], key: str) -> float:
    """Exact key, else the single entry whose column part is `key`."""
    if key in flat:
        return flat[key]
    hits = [k for k in flat if k.split("|")[-1] == key]
    if len(hits) == 1:
        return flat[hits[0]]
    why = "ambiguous" if hits else "missing"
    raise UserError(f"score key '{key}' is {why} in VLMEvalKit's table; valid keys: {', '.join(sorted(flat))}")


def check_mapping(spec: Mapping[str, Any]) -> None:
    unknown = sorted(set(spec) - set(MAPPING_KEYS))
    if unknown or (("key" in spec) == ("sum" in spec)):
        raise UserError(f"dataset score mapping {dict(spec)} is invalid; valid: exactly one of key/sum, "
                        f"then optionally one of max/per_sample/scale ({', '.join(MAPPING_KEYS)})")
    if sum(k in spec for k in ("max", "per_sample", "scale")) > 1:
        raise UserError("dataset score mapping: use at most one of max, per_sample, scale (valid: one of them or none)")


def main_score(flat: Mapping[str, float], spec: Mapping[str, Any], n_samples: int) -> float:
    """The record's `score` from the flattened table, per the dataset YAML's mapping."""
    check_mapping(spec)
    keys = [spec["key"]] if "key" in spec else list(spec["sum"])
    value = math.fsum(lookup(flat, str(k)) for k in keys)
    if "max" in spec:
        return 100.0 * value / float(spec["max"])
    if "per_sample" in spec:
        return 100.0 * value / (float(spec["per_sample"]) * n_samples)
    return value * float(spec.get("scale", 1.0))
