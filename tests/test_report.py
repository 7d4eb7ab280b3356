"""prunebench.report on synthetic records: relative numbers, ordering, seeds, warnings, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from prunebench import report
from prunebench.record import RECORD_NAME, RunRecord, save_record


def make(model: str = "llava", dataset: str = "gqa", method: str = "fastv", keep: float = 0.333,
         score: float | None = 60.0, seed: int = 0, prefill: float = 0.1, **kw) -> RunRecord:
    """A complete record with per-sample median timing and token counts."""
    n_in = 576
    fields = dict(
        model=model, dataset=dataset, method=method, method_params={}, stage="llm", positions="keep",
        keep=keep, seed=seed, limit=None, status="complete", n_samples=10, score=score,
        tokens={"n_visual_in": n_in, "n_visual_out": round(n_in * keep), "layer_avg": float(round(n_in * keep))},
        timing={"median": {"vision_s": 0.01, "method_s": 0.002, "prefill_s": prefill, "decode_s": 0.05,
                           "total_s": 0.3}, "clock": "cuda_events"},
        device={"name": "NVIDIA H100"}, finished_at="2025-01-01T00:00:00+00:00",
    )
    fields.update(kw)
    return RunRecord(**fields)


def vanilla(dataset: str = "gqa", score: float = 80.0, **kw) -> RunRecord:
    return make(dataset=dataset, method="vanilla", keep=1.0, score=score, prefill=0.2, stage="none", **kw)


def write(root: Path, *records: RunRecord) -> Path:
    for i, r in enumerate(records):
        save_record(root / f"{r.model}-{r.dataset}-{r.method}-{r.keep}-{r.seed}-{i}", r)
    return root


def rows(text: str) -> list[list[str]]:
    """The cells of the first markdown table in `text` (header and rule excluded)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|") or set(line) <= set("|-: "):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return body


def column(text: str, name: str) -> list[str]:
    header = next(line for line in text.splitlines() if line.startswith("|"))
    index = [c.strip() for c in header.strip("|").split("|")].index(name)
    return [row[index] for row in rows(text)]


def test_relative_drop_and_rise(tmp_path: Path) -> None:
    write(tmp_path, vanilla(), make(score=60.0), make(method="random", score=80.32))
    text = report.relative_table(report.collect(tmp_path), "llava")
    cells = column(text, "gqa")
    assert cells[0] == "80.0"
    assert "60.0 (↓25.0%)" in cells
    assert "80.3 (↑0.4%)" in cells


def test_avg_carries_relative_accuracy(tmp_path: Path) -> None:
    write(tmp_path, vanilla("gqa", 80.0), vanilla("mme", 50.0),
          make(dataset="gqa", score=60.0), make(dataset="mme", score=50.0))
    avg = column(report.relative_table(report.collect(tmp_path), "llava"), "Avg")
    assert avg == ["65.0", "55.0 (rel. 87.5%)"]


def test_ordering_keep_descending_vanilla_first(tmp_path: Path) -> None:
    write(tmp_path, make(method="fastv", keep=0.111), make(method="divprune", keep=0.333),
          make(method="fastv", keep=0.333), vanilla(), make(method="divprune", keep=0.222))
    table = rows(report.relative_table(report.collect(tmp_path), "llava"))
    assert [(r[0], r[1]) for r in table] == [
        ("1.0", "vanilla (upper bound)"), ("0.333", "divprune"), ("0.333", "fastv"),
        ("0.222", "divprune"), ("0.111", "fastv"),
    ]


def test_missing_vanilla_is_said_and_not_guessed(tmp_path: Path) -> None:
    write(tmp_path, vanilla("gqa"), make(dataset="gqa"), make(dataset="mme", score=40.0))
    text = report.relative_table(report.collect(tmp_path), "llava")
    assert "no vanilla run for llava / mme: relative scores not shown (run method=vanilla)" in text
    assert "no vanilla run for llava / gqa" not in text
    assert column(text, "mme") == ["—", "40.0"]
    assert column(text, "Avg")[1] == "50.0 (rel. 75.0%)"  # relative part only over gqa


def test_seeds_aggregate_to_mean_std(tmp_path: Path) -> None:
    write(tmp_path, vanilla(), *(make(method="random", seed=s, score=v) for s, v in [(0, 58.0), (1, 60.0),
                                                                                    (2, 62.0)]))
    text = report.relative_table(report.collect(tmp_path), "llava")
    table = rows(text)
    assert len(table) == 2
    assert table[1][1] == "random (3 seeds)"
    assert column(text, "gqa")[1] == "60.0 ± 2.0 (↓25.0%)"


def test_prefill_speedup_across_runs_is_marked(tmp_path: Path) -> None:
    write(tmp_path, vanilla(), make(prefill=0.1))
    text = report.relative_table(report.collect(tmp_path), "llava")
    assert column(text, "prefill ×") == ["1.00×", "2.00×*"]
    assert report.CROSS_RUN in text


def paired(**ratios: float) -> dict:
    return {"n_pairs": 3, "n_samples": 3, "vanilla_over_method": ratios}


def test_paired_control_gives_the_speed_ratio(tmp_path: Path) -> None:
    """A record with an in-process vanilla control: its paired ratio (3x), not the separate vanilla run's (2x)."""
    r = make(prefill=0.1)
    r.timing["paired"] = paired(prefill_s=3.0, ttft_s=2.5, total_s=1.5)
    write(tmp_path, vanilla(), r)
    records = report.collect(tmp_path)
    text = report.relative_table(records, "llava")
    assert column(text, "prefill ×") == ["1.00×", "3.00×"]
    assert report.CROSS_RUN not in text
    eff = report.efficiency_table(records, "llava")
    assert column(eff, "prefill ×") == ["1.00×", "3.00×"]
    assert column(eff, "TTFT ×") == ["—", "2.50×"]  # vanilla's fixture has no ttft median
    assert column(eff, "throughput ×") == ["1.00×", "1.50×"]
    assert column(eff, "pairs") == ["—", "3"]
    assert column(eff, "batch") == ["1", "1"]


def test_efficiency_table_marks_cross_run_ratios(tmp_path: Path) -> None:
    r = make(prefill=0.1, batch_size=4)
    r.timing.update(samples_per_s=2.0, tokens_per_s=16.0)
    write(tmp_path, vanilla(), r)
    text = report.render(report.collect(tmp_path))
    eff = text[text.index("efficiency vs vanilla"):]
    assert column(eff, "prefill ×") == ["1.00×", "2.00×*"]
    assert column(eff, "throughput ×") == ["1.00×", "1.00×*"]
    assert column(eff, "samples/s") == ["—", "2.000"] and column(eff, "batch") == ["1", "4"]
    assert report.CROSS_RUN in eff


def test_prefill_speedup_unavailable_without_timing(tmp_path: Path) -> None:
    write(tmp_path, vanilla(timing={}), make(prefill=0.1))
    assert column(report.relative_table(report.collect(tmp_path), "llava"), "prefill ×") == ["—", "—"]


def test_tokens_cell_shows_layer_average(tmp_path: Path) -> None:
    r = make(keep=0.111)
    r.tokens = {"n_visual_in": 576, "n_visual_out": 64, "layer_avg": 112.0}
    write(tmp_path, vanilla(), r)
    assert column(report.relative_table(report.collect(tmp_path), "llava"), "tokens") == [
        "576/576", "64/576 (avg 112.0)"]


def test_noise_warning_under_heading(tmp_path: Path) -> None:
    note = "untrained weights: scores are chance"
    write(tmp_path, vanilla(accuracy_meaningful=False, notes=[note, "other"]), make(model="real"))
    text = report.render(report.collect(tmp_path))
    lines = text.splitlines()
    i = lines.index("## llava")
    assert lines[i + 1] == f"> accuracy is noise: {note}"
    assert "> accuracy is noise" not in "\n".join(lines[lines.index("## real"):])


def test_incomplete_excluded_but_counted(tmp_path: Path) -> None:
    write(tmp_path, vanilla(), make(score=60.0), make(method="divprune", status="running", score=None),
          make(method="fastv", keep=0.111, status="running", score=None))
    text = report.render(report.collect(tmp_path))
    assert "divprune" not in "\n".join(line for line in text.splitlines() if line.startswith("|"))
    footer = text.strip().splitlines()[-1]
    assert footer.startswith("2 runs still running/incomplete: ")
    assert footer.count(RECORD_NAME) == 2


def test_bad_and_old_schema_files_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, vanilla())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / RECORD_NAME).write_text("{not json")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / RECORD_NAME).write_text(json.dumps({**make().to_dict(), "schema_version": 0}))
    records = report.collect(tmp_path)
    assert len(records) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: skipping") for line in err)
    assert any("broken" in line for line in err) and any("schema_version 0" in line for line in err)


def test_timing_table_in_ms(tmp_path: Path) -> None:
    write(tmp_path, vanilla(), make())
    text = report.render(report.collect(tmp_path))
    timing = text[text.index("per-sample median times"):]
    assert column(timing, "prefill ms") == ["200.0", "100.0"]
    assert column(timing, "clock") == ["cuda_events"] * 2
    assert column(timing, "device") == ["NVIDIA H100"] * 2


def test_main_on_empty_and_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(tmp_path)]) == 1
    assert report.main([str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "run python -m prunebench first" in err and "Traceback" not in err


def test_main_prints_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, vanilla(), make())
    assert report.main([str(tmp_path), "--format", "plain"]) == 0
    out = capsys.readouterr().out
    assert "## llava" in out and "60.0 (↓25.0%)" in out


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    write(tmp_path / "res", vanilla(), make(keep=0.333), make(keep=0.111, score=40.0),
          make(model="tiny", accuracy_meaningful=False, notes=["random weights"]))
    out = tmp_path / "fig.png"
    assert report.main([str(tmp_path / "res"), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, vanilla(), make())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert report.main([str(tmp_path), "--plot", str(tmp_path / "x.png")]) == 1
    assert "pip install matplotlib" in capsys.readouterr().err


def test_runs_on_other_dataset_settings_are_other_columns(tmp_path: Path) -> None:
    """A 1500-item measure run and a 600-item run of the same dataset are never one column: each pruned run is
    compared with the vanilla run on its own items."""
    def probe(n: int) -> dict:
        return {"dataset": {"name": "probe", "n": n, "seed": 0, "data_dir": f"/data{n}"}}

    write(tmp_path, vanilla("probe", 90.0, config=probe(600), finished_at="2025-01-02T00:00:00+00:00"),
          vanilla("probe", 80.0, config=probe(1500)), make(dataset="probe", score=40.0, config=probe(1500)),
          make(dataset="probe", method="random", score=45.0, config=probe(600)))
    text = report.relative_table(report.collect(tmp_path), "llava")
    assert column(text, "probe(n=1500)") == ["80.0", "40.0 (↓50.0%)", "—"]
    assert column(text, "probe(n=600)") == ["90.0", "—", "45.0 (↓50.0%)"]


def test_one_setting_is_one_plain_column(tmp_path: Path) -> None:
    config = {"dataset": {"name": "probe", "n": 600}}
    write(tmp_path, vanilla("probe", 90.0, config=config), make(dataset="probe", score=45.0, config=config))
    assert column(report.relative_table(report.collect(tmp_path), "llava"), "probe") == ["90.0", "45.0 (↓50.0%)"]


def test_flagged_runs_are_marked(tmp_path: Path) -> None:
    flagged = make(method="pdrop", keep=0.111, score=40.0)
    flagged.flags = ["budget unreachable: pdrop at layers [8, 16, 24] of 32 keeps at least 144.75 of 576"]
    text = report.render(report.collect(write(tmp_path, vanilla(), flagged, make(method="fastv", keep=0.111))))
    assert "pdrop ⚑" in text and "fastv ⚑" not in text
    assert "⚑ pdrop keep=0.111: budget unreachable: pdrop at layers [8, 16, 24]" in text


def test_runs_of_one_cell_with_other_job_keys_are_said(tmp_path: Path) -> None:
    old, new = make(score=50.0), make(score=60.0)
    old.key = {"model": {"path": "b"}, "method": {"name": "fastv", "positions": "original"}}
    new.key = {"model": {"path": "b"}, "method": {"name": "fastv", "positions": "keep"}}
    old.finished_at, new.finished_at = "2026-01-01", "2026-01-02"
    text = report.render(report.collect(write(tmp_path, vanilla(), old, new)))
    assert "fastv ‡" in text and "only the latest is shown" in text and "60.0" in text
    same = make(score=55.0)
    same.key = {"model": {"path": "b"}, "method": {"name": "fastv", "positions": "keep"}}
    text = report.render(report.collect(write(tmp_path / "other", vanilla(), same)))
    assert "‡" not in text


def test_runs_on_other_model_settings_are_other_sections(tmp_path: Path) -> None:
    """Runs of one model in float16 and in bfloat16 (or on another device) are two sections, each compared with
    its own vanilla run, never one table whose cells mix them."""
    def on(dtype: str, device: str = "cuda") -> dict:
        return {"model": {"name": "llava", "dtype": dtype, "path": None}, "device": device, "batch_size": 1}

    write(tmp_path, vanilla(score=80.0, key=on("float16")), make(score=40.0, key=on("float16")),
          vanilla(score=90.0, key=on("bfloat16")), make(score=45.0, key=on("bfloat16")),
          vanilla(score=70.0, key=on("float16", "cpu")))
    text = report.render(report.collect(tmp_path))
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["## llava(dtype=bfloat16, device=cuda)", "## llava(dtype=float16, device=cpu)",
                        "## llava(dtype=float16, device=cuda)"]
    bf16 = text.split("## llava(dtype=bfloat16, device=cuda)")[1].split("## ")[0]
    assert column(bf16, "gqa") == ["90.0", "45.0 (↓50.0%)"] and "‡" not in text
    cpu = text.split("## llava(dtype=float16, device=cpu)")[1].split("## ")[0]
    assert column(cpu, "gqa") == ["70.0"]


def test_one_model_setting_is_one_plain_section(tmp_path: Path) -> None:
    key = {"model": {"name": "llava", "dtype": "float16"}, "device": "cuda"}
    text = report.render(report.collect(write(tmp_path, vanilla(key=key), make(key=key))))
    assert [line for line in text.splitlines() if line.startswith("## ")] == ["## llava"]


def test_kv_column_is_vanilla_over_method_kv_bytes_after_prefill(tmp_path: Path) -> None:
    write(tmp_path, vanilla(memory={"kv_bytes_prefill": 4000.0}), make(memory={"kv_bytes_prefill": 1000.0}),
          make(method="random", memory={}))
    assert column(report.relative_table(report.collect(tmp_path), "llava"), "KV ×") == ["1.00×", "4.00×", "—"]


def test_flops_column_is_vanilla_over_method_vision_plus_prefill_flops(tmp_path: Path) -> None:
    write(tmp_path, vanilla(flops={"vision": 100.0, "llm_prefill": 300.0}),
          make(flops={"vision": 100.0, "llm_prefill": 100.0}), make(method="random", flops={}))
    assert column(report.relative_table(report.collect(tmp_path), "llava"), "FLOPs ×") == ["1.00×", "2.00×", "—"]
