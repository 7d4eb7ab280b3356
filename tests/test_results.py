"""prunebench.results.load: one DataFrame row per record, with its settings, scores, counts and times."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from test_report import make, vanilla, write

from prunebench import results
from prunebench.errors import UserError
from prunebench.record import RECORD_NAME


def test_load_gives_one_row_per_record_with_its_values(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    key = {"model": {"name": "llava", "weights": "random", "dtype": "float16"}, "device": "cuda"}
    pruned = make(method="fastv", keep=0.222, seed=3, limit=50, method_params={"k": 2, "a": [1]}, key=key,
                  metrics={"count": 40.0, "color": 70.5}, flops={"vision": 10.0, "llm_prefill": 30.0},
                  memory={"peak_gpu_bytes": 123, "kv_bytes_prefill": 64.0, "kv_layer_bytes_prefill": [32.0, 32.0]})
    pruned.timing.update(samples_per_s=4.0, paired={"vanilla_over_method": {"prefill_s": 1.8}})
    write(tmp_path, vanilla(), pruned, make(method="divprune", status="running", score=None))
    df = results.load(tmp_path)
    assert isinstance(df, pd.DataFrame) and len(df) == 3
    assert sorted(df["path"]) == sorted(str(p) for p in tmp_path.rglob(RECORD_NAME))
    assert sorted(df["status"]) == ["complete", "complete", "running"]

    row = df[df.method == "fastv"].iloc[0]
    expected = {"model": "llava", "dataset": "gqa", "method_params": json.dumps({"a": [1], "k": 2}), "keep": 0.222,
                "seed": 3, "limit": 50, "weights": "random", "dtype": "float16", "device": "cuda",
                "device_name": "NVIDIA H100", "score": 60.0, "metric.count": 40.0, "metric.color": 70.5,
                "tokens.n_visual_in": 576, "tokens.n_visual_out": 128, "timing.prefill_s": 0.1,
                "timing.total_s": 0.3, "timing.samples_per_s": 4.0, "timing.paired.prefill_s": 1.8,
                "timing.clock": "cuda_events", "flops.vision": 10.0, "flops.llm_prefill": 30.0,
                "memory.peak_gpu_bytes": 123, "memory.kv_bytes_prefill": 64.0}
    assert {k: row[k] for k in expected} == expected
    assert "memory.kv_layer_bytes_prefill" not in df.columns  # per-layer lists stay in the record
    assert list(df.columns[:3]) == ["model", "dataset", "method"] and list(df.columns[-2:]) == ["finished_at", "path"]

    van = df[df.method == "vanilla"].iloc[0]
    assert (van["keep"], van["score"]) == (1.0, 80.0) and pd.isna(van["limit"])  # the full set
    assert math.isnan(van["metric.count"]) and math.isnan(van["flops.vision"])  # absent, never guessed


def test_load_of_an_empty_folder_is_an_empty_frame(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    df = results.load(tmp_path)
    assert len(df) == 0 and "score" in df.columns


def test_load_without_pandas_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(UserError, match=r"pip install -e \.\[report\]") as err:
        results.load(write(tmp_path, vanilla()))
    assert "\n" not in str(err.value)
