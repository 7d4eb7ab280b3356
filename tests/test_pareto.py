"""prunebench.report's Pareto fronts: the dominance sweep, the points gathered from records, the figure and CLI."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from test_report import make, paired, vanilla, write

from prunebench import report
from prunebench.record import RunRecord

PNG = b"\x89PNG\r\n\x1a\n"


def brute_front(points: list[tuple[float, float]]) -> list[int]:
    """O(n^2): i is kept unless some j dominates it (>= in both, > in one) or an earlier j equals it."""
    def dominates(q: tuple[float, float], p: tuple[float, float]) -> bool:
        return q[0] >= p[0] and q[1] >= p[1] and q != p

    return [i for i, p in enumerate(points)
            if not any(dominates(q, p) or (q == p and j < i) for j, q in enumerate(points))]


@pytest.mark.parametrize("seed", range(40))
def test_pareto_front_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(0, 40)
    if seed % 2:  # a small integer grid: many ties in one coordinate and exact duplicates
        points = [(float(rng.randint(0, 5)), float(rng.randint(0, 5))) for _ in range(n)]
    else:
        points = [(rng.uniform(0.5, 8.0), rng.uniform(20.0, 100.0)) for _ in range(n)]
        points += [points[rng.randrange(n)] for _ in range(n // 4)] if n else []
    assert report.pareto_front(points) == brute_front(points)


def test_pareto_front_ties() -> None:
    assert report.pareto_front([]) == []
    assert report.pareto_front([(2.0, 5.0), (2.0, 5.0), (2.0, 5.0)]) == [0]  # equal in both: the first, once
    assert report.pareto_front([(1.0, 5.0), (2.0, 5.0), (2.0, 4.0), (3.0, 1.0)]) == [1, 3]  # ties in one: dominated
    assert report.pareto_front([(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]) == [0, 1, 2]


def both(method: str, keep: float, gqa: float, mme: float, **kw) -> list[RunRecord]:
    return [make(method=method, keep=keep, dataset="gqa", score=gqa, **kw),
            make(method=method, keep=keep, dataset="mme", score=mme, **kw)]


def records(root: Path) -> list[RunRecord]:
    """vanilla (gqa 80, mme 50) and four method x keep rows with paired, cross-run and missing costs."""
    van = [vanilla("gqa", 80.0), vanilla("mme", 50.0)]
    for r in van:
        r.timing["median"]["ttft_s"] = 0.3
        r.flops = {"vision": 100.0, "llm_prefill": 300.0}
    fastv = both("fastv", 0.333, 60.0, 50.0, flops={"vision": 100.0, "llm_prefill": 100.0})  # rel 87.5
    fastv[0].timing["paired"] = paired(prefill_s=2.0, ttft_s=2.5)
    fastv[1].timing["paired"] = paired(prefill_s=4.5, ttft_s=2.5)  # Avg: geometric mean 3.0
    rand = both("random", 0.333, 56.0, 40.0, flops={"vision": 100.0, "llm_prefill": 100.0})  # rel 75
    for r in rand:
        r.timing["paired"] = paired(prefill_s=2.0)
    low = both("fastv", 0.111, 40.0, 35.0, prefill=0.05, flops={"vision": 50.0, "llm_prefill": 50.0})  # rel 60
    for r in low:  # no paired control: cross-run, from vanilla's medians
        r.timing["median"]["ttft_s"] = 0.1
    div = both("divprune", 0.111, 44.0, 30.0)  # rel 57.5, no FLOPs
    for r in div:
        r.timing["paired"] = paired(prefill_s=3.5)
    write(root, *van, *fastv, *rand, *low, *div)
    return report.collect(root)


def coords(points: list[report.ParetoPoint]) -> list[tuple[str, float, float, float, bool]]:
    return [(p.method, p.keep, round(p.cost, 9), round(p.accuracy, 9), p.cross) for p in points]


def test_points_are_the_records_numbers(tmp_path: Path) -> None:
    points = report.pareto_points(records(tmp_path), "llava")
    assert list(points) == ["prefill", "ttft", "flops"]
    assert coords(points["prefill"]) == [
        ("vanilla", 1.0, 1.0, 100.0, False), ("fastv", 0.333, 3.0, 87.5, False),
        ("random", 0.333, 2.0, 75.0, False), ("divprune", 0.111, 3.5, 57.5, False),
        ("fastv", 0.111, 4.0, 60.0, True)]
    assert coords(points["ttft"]) == [("vanilla", 1.0, 1.0, 100.0, False), ("fastv", 0.333, 2.5, 87.5, False),
                                      ("fastv", 0.111, 3.0, 60.0, True)]
    assert coords(points["flops"]) == [("vanilla", 1.0, 1.0, 100.0, False), ("fastv", 0.333, 2.0, 87.5, False),
                                       ("random", 0.333, 2.0, 75.0, False), ("fastv", 0.111, 4.0, 60.0, False)]
    assert points["prefill"][-1].label == "fastv keep=0.111*"


def test_points_agree_with_the_main_table(tmp_path: Path) -> None:
    recs = records(tmp_path)
    points = report.pareto_points(recs, "llava")
    rows = {(row.name, row.keep): row for row in report.main_rows(recs, "llava", 0)[2] if row.name != "vanilla"}
    for axis, attr in (("prefill", "prefill"), ("flops", "flops")):
        for p in points[axis][1:]:
            row = rows[(p.method, p.keep)]
            assert (p.cost, p.accuracy) == pytest.approx((getattr(row, attr), row.rel))
            assert p.cross == (row.cross if axis == "prefill" else False)


def test_points_for_one_dataset_use_its_score_and_its_cost(tmp_path: Path) -> None:
    recs = records(tmp_path)
    points = report.pareto_points(recs, "llava", "gqa")
    assert coords(points["prefill"]) == [
        ("vanilla", 1.0, 1.0, 80.0, False), ("fastv", 0.333, 2.0, 60.0, False),
        ("random", 0.333, 2.0, 56.0, False), ("divprune", 0.111, 3.5, 44.0, False),
        ("fastv", 0.111, 4.0, 40.0, True)]
    assert report.pareto_points(recs, "llava", "nope") == {}


def fronts(fig) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(model, axis) -> the (x, y) of the panel's front line."""
    out = {}
    for ax in fig.axes:
        if ax.get_visible():
            _, model, axis = ax.get_gid().split(":")
            [line] = [line for line in ax.get_lines() if line.get_label() == report.FRONT]
            out[(model, axis)] = list(zip(line.get_xdata(), line.get_ydata(), strict=True))
    return out


def test_figure_joins_the_front_points(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    recs = records(tmp_path)
    fig = report.pareto_figure(recs)
    try:
        drawn = fronts(fig)
    finally:
        plt.close(fig)
    points = report.pareto_points(recs, "llava")
    assert set(drawn) == {("llava", axis) for axis in points}
    for axis, pts in points.items():
        front = sorted((pts[i].cost, pts[i].accuracy) for i in report.pareto_front([(p.cost, p.accuracy)
                                                                                    for p in pts]))
        assert drawn[("llava", axis)] == front
    # random 0.333 and divprune 0.111 are dominated by fastv at the same keep
    assert [(round(x, 9), y) for x, y in drawn[("llava", "prefill")]] == [(1.0, 100.0), (3.0, 87.5), (4.0, 60.0)]


def test_noise_is_said_in_the_panel_titles(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    write(tmp_path, vanilla(), make(), vanilla(model="tiny", accuracy_meaningful=False, notes=["random weights"]),
          make(model="tiny", accuracy_meaningful=False), vanilla(model="none", timing={}))
    fig = report.pareto_figure(report.collect(tmp_path))
    try:
        titles = {ax.get_gid() or ax.get_title(): ax.get_title() for ax in fig.axes if ax.get_visible()}
    finally:
        plt.close(fig)
    assert titles == {"pareto:llava:prefill": "llava", "pareto:tiny:prefill": "tiny\n(accuracy is noise)",
                      "none": "none"}  # a model without a measured cost: one panel, saying so


def test_cli_writes_the_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    records(tmp_path / "res")
    out = tmp_path / "figs" / "pareto.png"
    assert report.main([str(tmp_path / "res"), "--pareto", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    one = tmp_path / "gqa.png"
    assert report.main([str(tmp_path / "res"), "--pareto", str(one), "--pareto-dataset", "gqa"]) == 0
    assert one.read_bytes()[:8] == PNG
    assert f"wrote {one}" in capsys.readouterr().err
    assert report.main([str(tmp_path / "res"), "--pareto", str(tmp_path / "x.png"), "--pareto-dataset", "vqa"]) == 1
    assert "--pareto-dataset vqa: no such dataset column; the columns are gqa, mme" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "res"), "--pareto-dataset", "gqa"])


def test_cli_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, vanilla(), make())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert report.main([str(tmp_path), "--pareto", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [report.NO_MATPLOTLIB]


def test_method_variants_are_named_by_their_params(tmp_path: Path) -> None:
    write(tmp_path, vanilla(), make(keep=0.333), make(keep=0.111), make(keep=0.333, method_params={"k": 3}))
    names = [p.method for p in report.pareto_points(report.collect(tmp_path), "llava")["prefill"]]
    assert names == ["vanilla", 'fastv {"k": 3}', "fastv {}", "fastv {}"]  # keep descending, then params
