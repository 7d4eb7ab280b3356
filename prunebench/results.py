"""Every record under a results folder as one pandas DataFrame, a row per `record.json` (complete or not).

    from prunebench.results import load
    df = load("results")                          # pandas is the optional extra: pip install -e .[report]
    done = df[df.status == "complete"]
    done.groupby(["model", "dataset", "method", "keep"])["score"].agg(["mean", "std"])

Columns: the run's settings (model, dataset, method, method_params as sorted JSON, stage, positions, keep,
seed, limit: a whole number, missing for the full set, batch_size, weights, dtype, device: the run's cpu /
cuda, device_name), status, n_samples, n_failed, accuracy_meaningful, score, then `metric.<category>`,
`tokens.<count>` (n_visual_in, n_visual_out, layer_avg, ...), `timing.<field>` (per-sample medians: total_s,
vision_s, method_s, prefill_s, decode_s, ttft_s, tpot_s; and samples_per_s, tokens_per_s, clock),
`timing.paired.<field>` (vanilla / method time from the in-process control), `flops.<part>`, `memory.<field>`
(peak_gpu_bytes, kv_bytes_prefill, kv_bytes_end), finished_at and path (the record.json). Numbers a record
lacks are missing (NaN / None), never guessed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunebench.errors import UserError
from prunebench.record import RunRecord
from prunebench.report import collect

INSTALL_HINT = "prunebench.results.load needs pandas: pip install -e .[report]"
SETTINGS = ("model", "dataset", "method", "method_params", "stage", "positions", "keep", "seed", "limit",
            "batch_size", "weights", "dtype", "device", "device_name", "status", "n_samples", "n_failed",
            "accuracy_meaningful", "score")
GROUPS = ("metric.", "tokens.", "timing.", "flops.", "memory.")  # the columns after the settings, in this order
TAIL = ("finished_at", "path")


def load(root: str | Path) -> Any:
    """The records under `root` as a pandas DataFrame, one row per record (`row` gives its columns)."""
    try:
        import pandas as pd
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return _ordered(pd.DataFrame(rows(collect(Path(root)))))


def rows(records: list[RunRecord]) -> list[dict[str, Any]]:
    return [row(r) for r in records]


def row(r: RunRecord) -> dict[str, Any]:
    """One record's columns (see the module docstring)."""
    source = r.key or r.config or {}  # the job key; a record older than the key: its resolved config
    model = source.get("model") or {}
    timing, path = r.timing or {}, getattr(r, "source", None)
    return {
        "model": r.model, "dataset": r.dataset, "method": r.method,
        "method_params": json.dumps(r.method_params, sort_keys=True, default=str), "stage": r.stage,
        "positions": r.positions, "keep": float(r.keep), "seed": r.seed, "limit": r.limit,
        "batch_size": r.batch_size, "weights": model.get("weights"), "dtype": model.get("dtype"),
        "device": source.get("device") or (r.device or {}).get("type"), "device_name": (r.device or {}).get("name"),
        "status": r.status, "n_samples": r.n_samples, "n_failed": r.n_failed,
        "accuracy_meaningful": r.accuracy_meaningful, "score": r.score,
        **_scalars("metric.", r.metrics), **_scalars("tokens.", r.tokens),
        **_scalars("timing.", timing.get("median") or {}),
        **_scalars("timing.", {k: timing.get(k) for k in ("samples_per_s", "tokens_per_s", "clock")}),
        **_scalars("timing.paired.", (timing.get("paired") or {}).get("vanilla_over_method") or {}),
        **_scalars("flops.", r.flops), **_scalars("memory.", r.memory),
        "finished_at": r.finished_at, "path": str(path) if path else None,
    }


def _scalars(prefix: str, values: Mapping[str, Any] | None) -> dict[str, Any]:
    """The mapping's single values under `prefix` (lists and nested tables, e.g. per-layer bytes, left out)."""
    return {f"{prefix}{k}": v for k, v in (values or {}).items() if not isinstance(v, list | dict)}


def _ordered(df: Any) -> Any:
    """Settings first, then the grouped columns (each group sorted), then finished_at and path."""
    rest = [c for c in df.columns if c not in SETTINGS and c not in TAIL]
    grouped = [c for g in GROUPS for c in sorted(c for c in rest if c.startswith(g))]
    df = df.reindex(columns=[*SETTINGS, *grouped, *TAIL])
    return df.astype({"limit": "Int64"})  # a whole number or missing (the full set), not 50.0 / NaN
