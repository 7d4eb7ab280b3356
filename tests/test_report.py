"""prunebench.report on synthetic records: relative numbers, ordering, seeds, warnings, CLI."""

from __future__ import annotations

import json
import statistics
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


# ---------------------------------------------------------------- paired intervals: ≈v / ≈r

def answered(record: RunRecord, correct: list[int], failed: tuple[int, ...] = ()) -> RunRecord:
    """The record with per-sample predictions (item i answered correct[i]; `failed`: rows with an error) and the
    score the runner would give it: the mean of `correct` over the error-free rows."""
    record.rows = [{"index": i, "category": "c", "prediction": "x", "correct": bool(c),  # type: ignore[attr-defined]
                    "error": "RuntimeError: boom" if i in failed else None} for i, c in enumerate(correct)]
    ok = [c for i, c in enumerate(correct) if i not in failed]
    record.score = 100.0 * sum(ok) / len(ok)
    return record


def write_answered(root: Path, *records: RunRecord) -> Path:
    write(root, *records)
    for i, r in enumerate(records):
        rows = getattr(r, "rows", None)
        if rows is not None:
            folder = root / f"{r.model}-{r.dataset}-{r.method}-{r.keep}-{r.seed}-{i}"
            (folder / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


ALL = [1] * 200
HALF = [i % 2 for i in range(200)]
NEAR_ALL = [0 if i in (3, 77) else 1 for i in range(200)]  # two misses in 200: indistinguishable from ALL


def csv_rows(text: str) -> list[dict[str, str]]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(text)))


def test_marks_appear_exactly_when_the_interval_contains_zero(tmp_path: Path) -> None:
    write_answered(tmp_path, answered(vanilla(), ALL),
                   answered(make(method="random_pre", keep=0.111), HALF),
                   answered(make(method="fastv", keep=0.111), HALF),       # = random_pre, far below vanilla
                   answered(make(method="divprune", keep=0.111), NEAR_ALL),  # = vanilla, far above random_pre
                   answered(make(method="tome", keep=0.333), NEAR_ALL))     # no random_pre at its keep
    records = report.collect(tmp_path)
    text = report.relative_table(records, "llava")
    cells = dict(zip(column(text, "method"), column(text, "gqa"), strict=True))
    assert cells == {"vanilla (upper bound)": "100.0", "tome": "99.0 (↓1.0%) ≈v", "divprune": "99.0 (↓1.0%) ≈v",
                     "fastv": "50.0 (↓50.0%) ≈r", "random_pre": "50.0 (↓50.0%)"}
    assert report.LEGEND["vanilla"] in text and report.LEGEND["random_pre"] in text
    assert "items paired: gqa 200" in text
    table = csv_rows(report.csv_table(records))
    compared = {ref: [r["method"] for r in table if r[f"gqa.vs_{ref}.low"]] for ref in report.REFERENCES}
    assert compared == {"vanilla": ["tome", "divprune", "fastv", "random_pre"], "random_pre": ["divprune", "fastv"]}
    for row in table:  # the mark is the interval's: contains 0 <=> marked
        cell = cells["vanilla (upper bound)" if row["method"] == "vanilla" else row["method"]]
        for ref, mark in report.REFERENCES.items():
            low, high = row[f"gqa.vs_{ref}.low"], row[f"gqa.vs_{ref}.high"]
            assert (bool(low) and float(low) <= 0 <= float(high)) == (mark in cell)


def test_intervals_pair_items_by_index_on_those_error_free_in_both(tmp_path: Path) -> None:
    """Vanilla failed item 0, the pruned run item 1: 198 pairs, matched by index whatever the file order, and
    the interval is stats.paired_bootstrap's on them (in score points)."""
    from prunebench.stats import paired_bootstrap

    ours = [int(i % 3 != 0) for i in range(200)]
    pruned = answered(make(), ours, failed=(1,))
    pruned.rows.reverse()  # type: ignore[attr-defined]
    write_answered(tmp_path, answered(vanilla(), NEAR_ALL, failed=(0,)), pruned)
    records = report.collect(tmp_path)
    row = next(r for r in csv_rows(report.csv_table(records)) if r["method"] == "fastv")
    items = [i for i in range(200) if i not in (0, 1)]
    diff, low, high = paired_bootstrap([ours[i] for i in items], [NEAR_ALL[i] for i in items], 2000, 0)
    assert int(row["gqa.vs_vanilla.pairs"]) == 198
    got = [float(row[f"gqa.vs_vanilla.{f}"]) for f in ("diff", "low", "high")]
    assert got == pytest.approx([100 * diff, 100 * low, 100 * high], abs=1e-9)
    assert high < 0 and "≈v" not in column(report.relative_table(records, "llava"), "gqa")[1]
    assert "items paired: gqa 198" in report.relative_table(records, "llava")


def test_seeds_are_averaged_per_item_before_resampling(tmp_path: Path) -> None:
    seed0, seed1 = HALF, [1 - c for c in HALF[:100]] + HALF[100:]
    write_answered(tmp_path, answered(vanilla(), ALL), answered(make(method="random", seed=0), seed0),
                   answered(make(method="random", seed=1), seed1))
    row = next(r for r in csv_rows(report.csv_table(report.collect(tmp_path))) if r["method"] == "random")
    per_item = [(a + b) / 2 - 1 for a, b in zip(seed0, seed1, strict=True)]
    assert float(row["gqa.vs_vanilla.diff"]) == pytest.approx(100 * sum(per_item) / 200)
    assert int(row["gqa.vs_vanilla.pairs"]) == 200


def test_no_interval_where_the_score_is_not_a_per_sample_mean(tmp_path: Path) -> None:
    """An MME-style score (not the mean of `correct`) and predictions without `correct` get no mark, and the
    lines under the table say why; a record without predictions.jsonl too."""
    mme = answered(make(dataset="mme"), NEAR_ALL)
    mme.score = 1500.0  # a paired / summed score, not the mean of the rows' `correct`
    judged = answered(make(dataset="pope"), NEAR_ALL)
    for r in judged.rows:  # type: ignore[attr-defined]
        del r["correct"]
    write_answered(tmp_path, answered(vanilla("mme"), NEAR_ALL), answered(vanilla("pope"), NEAR_ALL), mme, judged,
                   vanilla("gqa"), make(dataset="gqa"))
    text = report.relative_table(report.collect(tmp_path), "llava")
    assert "≈" not in "\n".join(line for line in text.splitlines() if line.startswith("|"))
    assert f"no paired interval for llava / mme: {report.NOT_A_MEAN}" in text
    assert f"no paired interval for llava / pope: {report.NO_CORRECT}" in text
    assert f"no paired interval for llava / gqa: {report.NO_PREDICTIONS}" in text
    assert report.LEGEND["vanilla"] not in text


def test_resamples_zero_computes_no_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_answered(tmp_path, answered(vanilla(), ALL), answered(make(), NEAR_ALL))
    assert report.main([str(tmp_path), "--resamples", "0"]) == 0
    out = capsys.readouterr().out
    assert "99.0 (↓1.0%)" in out and "≈v" not in out and "no paired interval" not in out
    assert report.main([str(tmp_path)]) == 0 and "99.0 (↓1.0%) ≈v" in capsys.readouterr().out


# ---------------------------------------------------------------- export: CSV, LaTeX

def export_records(root: Path) -> list[RunRecord]:
    """Two datasets, a method on both, a three-seed method on one, a flagged one with paired speed."""
    fast = answered(make(dataset="gqa", keep=0.111, prefill=0.05), HALF)
    fast.flags = ["budget unreachable: test"]
    return report.collect(write_answered(
        root, answered(vanilla("gqa", flops={"vision": 100.0, "llm_prefill": 300.0}), ALL), vanilla("mme", 50.0),
        answered(make(dataset="gqa", flops={"vision": 100.0, "llm_prefill": 100.0}), NEAR_ALL),
        make(dataset="mme", score=40.0), fast,
        *(make(method="random", dataset="mme", seed=s, score=v) for s, v in [(0, 41.0), (1, 44.5), (2, 47.25)])))


def test_csv_has_the_table_numbers_in_plain_columns(tmp_path: Path) -> None:
    records = export_records(tmp_path)
    table = csv_rows(report.csv_table(records))
    text = report.relative_table(records, "llava")
    assert [(r["method"], r["keep"]) for r in table] == [("vanilla", "1.0"), ("fastv", "0.333"),
                                                         ("random", "0.333"), ("fastv", "0.111")]
    scores = {(r.method, r.keep, r.dataset): [] for r in records}
    for r in records:
        scores[(r.method, r.keep, r.dataset)].append(r.score)
    bases = {"gqa": 100.0, "mme": 50.0}
    for row, gqa, mme in zip(table, column(text, "gqa"), column(text, "mme"), strict=True):
        assert row["model"] == "llava" and all("±" not in v and "↓" not in v and "×" not in v for v in row.values())
        for ds, cell in (("gqa", gqa), ("mme", mme)):
            got = scores.get((row["method"], float(row["keep"]), ds))
            if got is None:
                assert row[f"{ds}.score"] == "" and cell == "—"
                continue
            mean = statistics.mean(got)
            assert float(row[f"{ds}.score"]) == pytest.approx(mean, abs=1e-12)
            assert cell.startswith(f"{float(row[f'{ds}.score']):.1f}")  # the text table shows the same number
            assert row[f"{ds}.std"] == ("" if len(got) == 1 else str(statistics.stdev(got)))
            if row["method"] == "vanilla":
                assert row[f"{ds}.change_pct"] == ""
            else:
                assert float(row[f"{ds}.change_pct"]) == pytest.approx((mean - bases[ds]) / bases[ds] * 100)
    random = table[2]
    assert (random["seeds"], random["mme.std"]) == ("3", str(statistics.stdev([41.0, 44.5, 47.25])))
    assert column(text, "mme")[2] == f"44.2 ± {statistics.stdev([41.0, 44.5, 47.25]):.1f} (↓11.5%)"
    fastv = table[1]
    assert float(fastv["flops_x"]) == 2.0 and float(fastv["prefill_x"]) == 2.0 and fastv["prefill_cross_run"] == "True"
    assert float(fastv["avg"]) == pytest.approx((99.0 + 40.0) / 2) and fastv["avg_datasets"] == "2"
    assert float(fastv["avg_rel_pct"]) == pytest.approx((99.0 / 100 + 40.0 / 50) / 2 * 100)
    assert (table[3]["flagged"], table[3]["avg_datasets"], table[3]["mme.score"]) == ("True", "1", "")
    assert float(fastv["tokens_out"]) == round(576 * 0.333) and float(fastv["tokens_in"]) == 576


def latex_body(text: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and body cells of the first tabular in `text`."""
    lines = text.splitlines()
    start, mid, end = (lines.index(x) for x in (r"\toprule", r"\midrule", r"\bottomrule"))
    def cells(line: str) -> list[str]:
        assert line.endswith(r" \\")
        return [c.strip() for c in line[:-3].split(" & ")]
    assert start + 2 == mid
    return cells(lines[start + 1]), [cells(line) for line in lines[mid + 1:end]]


def test_latex_is_a_booktabs_tabular_with_the_table_numbers(tmp_path: Path) -> None:
    records = export_records(tmp_path)
    text = report.render(records, "latex")
    headers, body = latex_body(text)
    assert text.startswith("% llava\n\\begin{tabular}{lll" + "r" * (len(headers) - 3) + "}\n")
    assert r"\end{tabular}" in text and headers[:5] == ["keep", "method", "stage", "gqa", "mme"]
    assert all(len(row) == len(headers) for row in body)
    tabular = text[text.index(r"\begin{tabular}"):text.index(r"\end{tabular}")]
    assert tabular.isascii()  # every glyph spelled in LaTeX: pdflatex-safe
    plain = rows(report.relative_table(records, "llava"))
    for tex, md in zip(body, plain, strict=True):
        for i in (3, 4):  # gqa, mme: the same leading score as the markdown table, std after $\pm$
            assert tex[i].split(" ")[0] == md[i].split(" ")[0].replace("—", "---")
    assert body[2][4].startswith(r"44.2 $\pm$ 3.1 ($\downarrow$11.5\%)")
    assert body[1][3] == r"99.0 ($\downarrow$1.0\%) $\approx$v" and body[1][6] == r"2.00$\times$*"
    assert body[3][1] == r"fastv $^\triangle$" and r"% ⚑ fastv keep=0.111: budget unreachable: test" in text


def test_latex_escapes_names(tmp_path: Path) -> None:
    write(tmp_path, vanilla(dataset="my_set"), make(method="random_pre", dataset="my_set", method_params={"a": 1}),
          make(method="random_pre", dataset="my_set", method_params={"a": 2}))
    _, body = latex_body(report.render(report.collect(tmp_path), "latex"))
    assert body[1][1] == r'random\_pre \{"a": 1\}' and body[1][2] == "llm"


def test_main_writes_csv_and_latex_to_stdout_and_the_footer_to_stderr(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, vanilla(), make(), make(method="divprune", status="running", score=None))
    assert report.main([str(tmp_path), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert [r["method"] for r in csv_rows(out)] == ["vanilla", "fastv"]
    assert err.startswith("1 run still running/incomplete: ")
    assert report.main([str(tmp_path), "--format", "latex"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("% llava\n") and "still running" not in out and "still running" in err
