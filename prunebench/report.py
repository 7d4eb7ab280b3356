"""Turn the `record.json` files under a results folder into per-model tables (and plots).

    python -m prunebench.report [DIR] [--plot OUT.png] [--pareto OUT.png [--pareto-dataset NAME]]
                                [--format markdown|github|plain|csv|latex] [--resamples N]

Scores are shown beside their relative change vs the vanilla run of the same model and
dataset; a dataset with no complete vanilla run gets bare scores and a line saying so (a
baseline is never guessed). `Avg` carries the mean relative accuracy (score / vanilla x 100,
averaged over datasets) as in UniPruneBench; records that differ only by seed are shown as
`mean ± std` (sample std), UniPruneBench Table 1 style. A cell is marked `≈v` when the paired
bootstrap 95% interval of its score minus vanilla's, over the items both answered, contains 0
(`stats.paired_bootstrap`, from the records' predictions.jsonl), and `≈r` when that of its score minus
random_pre's at the same keep does; only where the score is the mean of per-sample `correct`.

`--format csv` and `--format latex` write the main tables only (one CSV for every model, plain numbers in
columns of their own; a booktabs tabular per model, to \\input); `prunebench.results.load` gives every record
as a DataFrame. `--pareto` draws accuracy against measured cost (prefill, TTFT, FLOPs ratios to vanilla), one
row of panels per model, the non-dominated method x keep points joined (`pareto_front`, `pareto_points`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from prunebench.record import PREDICTIONS_NAME, RECORD_NAME, RunRecord, load_record, read_jsonl
from prunebench.stats import RESAMPLES as BOOTSTRAP_RESAMPLES
from prunebench.stats import SEED as BOOTSTRAP_SEED
from prunebench.stats import paired_bootstrap

DEFAULT_ROOT = Path("results")
FORMATS = {"markdown": "pipe", "github": "github", "plain": "plain"}  # text tables (tabulate's names)
EXPORTS = ("csv", "latex")  # the main tables only, for a spreadsheet or a paper
TIMING_COLUMNS = ("vision_s", "method_s", "prefill_s", "decode_s", "total_s", "ttft_s", "tpot_s")
DASH = "—"
CROSS_RUN = ("* cross-run ratio: this record has no paired vanilla control, so vanilla's time comes from a "
             "separate run (another process, another time); rerun with control=N for a paired ratio")

# (keep, method, method_params as sorted JSON): one table row
RowKey = tuple[float, str, str]
# row -> dataset -> the row's records for that dataset (one per seed)
Grid = dict[RowKey, dict[str, list[RunRecord]]]


# ---------------------------------------------------------------- loading

def collect(root: Path) -> list[RunRecord]:
    """Every loadable `record.json` below `root`, complete or not.

    Unreadable files and other schema versions are skipped with one warning line on stderr.
    Each record remembers its file as the attribute `source` (not a schema field).
    """
    records = []
    for path in sorted(Path(root).rglob(RECORD_NAME)):
        try:
            record = load_record(path)
        except (OSError, ValueError, TypeError, AttributeError) as err:
            reason = " ".join(str(err).split())
            print(f"warning: skipping {path}: {reason}", file=sys.stderr)
            continue
        record.source = path  # type: ignore[attr-defined]
        records.append(record)
    return records


def _latest_per_seed(records: list[RunRecord]) -> list[RunRecord]:
    """One record per (model section, dataset column, method, params, keep, seed): the last finished."""
    _name_sections(records)
    _name_columns(records)
    best: dict[tuple, RunRecord] = {}
    for r in sorted(records, key=lambda r: r.finished_at or ""):
        cell = (section_of(r), dataset_label(r), _row_key(r), r.seed)
        older = best.get(cell)
        # another experiment (its job key differs: model path, device, batch size, ...) in the same cell
        r.shadows = bool(older is not None and (getattr(older, "shadows", False)  # type: ignore[attr-defined]
                                                or (older.key and r.key and older.key != r.key)))
        best[cell] = r
    return list(best.values())


_RUN_SETTINGS = ("device", "batch_size", "cpu_threads", "warmup")  # a job-key field that changes the timing


def _model_settings(r: RunRecord) -> dict[str, Any]:
    """What the record ran on: its model config (name aside) and the run settings of its job key (the
    record's config for records older than the key); unset values are left out."""
    source = r.key or r.config or {}
    model = {k: v for k, v in (source.get("model") or {}).items() if k != "name"}
    runs = {k: source.get(k) for k in _RUN_SETTINGS}
    return {k: v for k, v in {**model, **runs}.items() if v is not None}


def _name_sections(records: list[RunRecord]) -> None:
    """Give each record its model section (the attribute `section`, not a schema field).

    Runs of one model whose model or run settings differ (`model.dtype`, `model.path`, the device, the batch
    size, ...) measured different things, so they are different sections, named by the settings that differ:
    `llava15(dtype=bfloat16)` beside `llava15(dtype=float16)`, never one table mixing them.
    """
    settings = {id(r): _model_settings(r) for r in records}
    by_model: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        by_model[r.model].append(r)
    for name, recs in by_model.items():
        keys = sorted({k for r in recs for k in settings[id(r)]},
                      key=lambda k: (k in _RUN_SETTINGS, _RUN_SETTINGS.index(k) if k in _RUN_SETTINGS else 0, k))
        differ = [k for k in keys if len({json.dumps(settings[id(r)].get(k), sort_keys=True, default=str)
                                          for r in recs if k in settings[id(r)]}) > 1]
        for r in recs:
            own = [f"{k}={_setting(settings[id(r)][k])}" for k in differ if k in settings[id(r)]]
            r.section = name + (f"({', '.join(own)})" if own else "")  # type: ignore[attr-defined]


def section_of(r: RunRecord) -> str:
    """The record's model section: its model name, with the settings that set it apart (`_name_sections`)."""
    return getattr(r, "section", None) or r.model


def _sections(records: list[RunRecord]) -> list[str]:
    _name_sections(records)
    return sorted({section_of(r) for r in records})


_NOT_SETTINGS = {"name", "data_dir", "limit"}  # the limit is the record's own `[:N]`; data_dir is where, not what


def _setting(value: Any) -> str:
    return "+".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _name_columns(records: list[RunRecord]) -> None:
    """Give each record its dataset column (the attribute `column`, not a schema field).

    Runs of one dataset whose dataset settings differ (`dataset.n`, `seed`, `families`, ...) asked different
    items, so they are different columns, named by the settings that differ: `probe(n=1500)` beside
    `probe(n=600)`, never one column whose vanilla and pruned cells come from different item sets.
    """
    settings = {id(r): {k: v for k, v in (r.config.get("dataset") or {}).items() if k not in _NOT_SETTINGS}
                for r in records}
    by_name: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        by_name[r.dataset].append(r)
    for name, recs in by_name.items():
        keys = sorted({k for r in recs for k in settings[id(r)]})
        differ = [k for k in keys
                  if len({json.dumps(settings[id(r)].get(k), sort_keys=True, default=str) for r in recs}) > 1]
        for r in recs:
            own = settings[id(r)]
            label = name + (f"({', '.join(f'{k}={_setting(own.get(k))}' for k in differ)})" if differ else "")
            r.column = label if r.limit is None else f"{label}[:{r.limit}]"  # type: ignore[attr-defined]


# ---------------------------------------------------------------- grouping

def _row_key(r: RunRecord) -> RowKey:
    return (round(float(r.keep), 6), r.method, json.dumps(r.method_params, sort_keys=True, default=str))


def _row_order(key: RowKey) -> tuple:
    """keep descending, then vanilla, then methods alphabetically."""
    keep, method, params = key
    return (-keep, method != "vanilla", method, params)


def _grid(records: list[RunRecord], model: str) -> Grid:
    grid: Grid = defaultdict(lambda: defaultdict(list))
    for r in records:
        if section_of(r) == model:
            grid[_row_key(r)][dataset_label(r)].append(r)
    return {k: dict(grid[k]) for k in sorted(grid, key=_row_order)}


def dataset_label(r: RunRecord) -> str:
    """The record's dataset column: a run on the first N samples is a different column from the full set, and
    runs with other dataset settings are too (`_name_columns`)."""
    column = getattr(r, "column", None)
    return column or (r.dataset if r.limit is None else f"{r.dataset}[:{r.limit}]")


def _vanilla(grid: Grid) -> dict[str, list[RunRecord]]:
    """The model's vanilla records per dataset (whatever keep they were run at)."""
    base: dict[str, list[RunRecord]] = defaultdict(list)
    for (_, method, _), by_ds in grid.items():
        if method == "vanilla":
            for ds, recs in by_ds.items():
                base[ds].extend(recs)
    return base


def _datasets(grid: Grid) -> list[str]:
    return sorted({ds for by_ds in grid.values() for ds in by_ds})


# ---------------------------------------------------------------- numbers

def _scores(recs: list[RunRecord]) -> list[float]:
    return [float(r.score) for r in recs if r.score is not None]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _base_scores(base: dict[str, list[RunRecord]]) -> dict[str, float]:
    """Vanilla mean score per dataset, only where it is usable as a denominator."""
    means = {ds: _mean(_scores(recs)) for ds, recs in base.items()}
    return {ds: m for ds, m in means.items() if m}


def _kv_prefill(recs: list[RunRecord]) -> float | None:
    values = [(r.memory or {}).get("kv_bytes_prefill") for r in recs]
    return _mean([float(v) for v in values if v])


def _prefill_flops(recs: list[RunRecord]) -> float | None:
    values = [(r.flops or {}).get("vision", 0) + (r.flops or {}).get("llm_prefill", 0) for r in recs]
    return _mean([float(v) for v in values if v])


def _speedup(by_ds: dict[str, list[RunRecord]], base: dict[str, list[RunRecord]],
             measure: Callable[[list[RunRecord]], float | None]) -> float | None:
    """Geometric mean over datasets of vanilla's measure / this row's (FLOPs, KV bytes)."""
    ratios = []
    for ds, recs in by_ds.items():
        ours, theirs = measure(recs), measure(base.get(ds, []))
        if ours and theirs:
            ratios.append(theirs / ours)
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None


def _paired(recs: list[RunRecord], field: str) -> float | None:
    """Mean over the records (seeds) of their paired vanilla / method ratio for `field`; None unless every record
    has one (a vanilla control timed in its own process)."""
    values = [((r.timing or {}).get("paired") or {}).get("vanilla_over_method", {}).get(field) for r in recs]
    return _mean([float(v) for v in values]) if values and all(v for v in values) else None


def _speed(by_ds: dict[str, list[RunRecord]], base: dict[str, list[RunRecord]], is_vanilla: bool,
           field: str = "prefill_s") -> tuple[float | None, bool]:
    """(geometric mean over datasets of vanilla time / this row's, cross): each dataset's ratio from the
    records' paired control when they have one, else from the separate vanilla run (cross = True: timed at
    another time, in another process)."""
    if is_vanilla:
        return (1.0 if any(_median_field(recs, field) for recs in by_ds.values()) else None), False
    ratios, cross = [], False
    for ds, recs in by_ds.items():
        paired = _paired(recs, field)
        if paired is None:
            ours, theirs = _median_field(recs, field), _median_field(base.get(ds, []), field)
            paired = theirs / ours if ours and theirs else None
            cross |= paired is not None
        if paired:
            ratios.append(paired)
    return (math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None), cross


def _median_field(recs: list[RunRecord], field: str) -> float | None:
    values = [r.timing.get("median", {}).get(field) for r in recs]
    return _mean([float(v) for v in values if v])


def _ratio_cell(value: float | None, cross: bool = False) -> str:
    return DASH if value is None else f"{value:.2f}×" + ("*" if cross else "")


def _rel_accuracy(by_ds: dict[str, list[RunRecord]], bases: dict[str, float]) -> float | None:
    """Mean over datasets with a vanilla score of score / vanilla x 100."""
    rel = [m / bases[ds] * 100 for ds, recs in by_ds.items()
           if ds in bases and (m := _mean(_scores(recs))) is not None]
    return _mean(rel)


# ---------------------------------------------------------------- paired intervals

NO_PREDICTIONS = f"a run has no {PREDICTIONS_NAME} beside its record"
NO_CORRECT = "its predictions carry no per-sample `correct` (scored by the benchmark's own scorer)"
NOT_A_MEAN = "its score is not the mean of per-sample `correct` (a benchmark's own score, e.g. MME's paired score)"
NO_ANSWERS = "a run has no error-free prediction"
NO_COMMON = "no item is error-free in both runs"
# the references a row is compared with, and the mark its cell gets when the interval contains 0
REFERENCES = {"vanilla": "≈v", "random_pre": "≈r"}
LEGEND = {"vanilla": "indistinguishable from vanilla: the paired bootstrap 95% interval of the run's score minus "
                     "vanilla's contains 0",
          "random_pre": "indistinguishable from random_pre at the same keep: the paired bootstrap 95% interval of "
                        "the run's score minus random_pre's contains 0"}


@dataclass(frozen=True)
class Paired:
    """A run minus a reference run on the same items, in score points: the mean difference, its paired
    bootstrap 95% interval (`stats.paired_bootstrap`) and the number of items paired."""
    diff: float
    low: float
    high: float
    pairs: int

    @property
    def indistinguishable(self) -> bool:
        return self.low <= 0.0 <= self.high


def _per_sample(r: RunRecord) -> dict[str, float] | str:
    """Item index -> 1.0 / 0.0 over the record's error-free predictions (the last row per index, as the runner
    resumes), or why there is none. Only where the record's score is their mean: a benchmark scored its own way
    (VLMEvalKit's MME sums paired questions) has no per-item difference to resample. Read once per record."""
    if not hasattr(r, "per_sample"):
        r.per_sample = _read_per_sample(r)  # type: ignore[attr-defined]
    return r.per_sample  # type: ignore[attr-defined]


def _read_per_sample(r: RunRecord) -> dict[str, float] | str:
    source = getattr(r, "source", None)
    path = Path(source).parent / r.predictions if source else None
    if path is None or not path.is_file():
        return NO_PREDICTIONS
    last = {str(row["index"]): row for row in read_jsonl(path) if "index" in row}
    ok = {i: row for i, row in last.items() if row.get("error") is None}
    if not ok:
        return NO_ANSWERS
    if any("correct" not in row for row in ok.values()):
        return NO_CORRECT
    correct = {i: float(bool(row["correct"])) for i, row in ok.items()}
    mean = 100.0 * sum(correct.values()) / len(correct)
    if r.score is None or not math.isclose(mean, float(r.score), rel_tol=1e-9, abs_tol=1e-9):
        return NOT_A_MEAN
    return correct


def _pooled(recs: list[RunRecord]) -> dict[str, float] | str:
    """Per item, the mean correctness over the records (one per seed), on the items error-free in all of them."""
    per = [_per_sample(r) for r in recs]
    reason = next((p for p in per if isinstance(p, str)), None)
    if reason is not None:
        return reason
    items = set.intersection(*(set(p) for p in per))  # type: ignore[arg-type]
    return {i: statistics.fmean(p[i] for p in per) for i in items}  # type: ignore[index]


def _compare(recs: list[RunRecord], refs: list[RunRecord], n_resamples: int) -> Paired | str:
    """The row's records minus the reference's on the items present and error-free in both (or why not)."""
    ours, theirs = _pooled(recs), _pooled(refs)
    if isinstance(ours, str):
        return ours
    if isinstance(theirs, str):
        return theirs
    items = sorted(set(ours) & set(theirs), key=_item_order)
    if not items:
        return NO_COMMON
    diff, low, high = paired_bootstrap([ours[i] for i in items], [theirs[i] for i in items], n_resamples,
                                       BOOTSTRAP_SEED)
    return Paired(100 * diff, 100 * low, 100 * high, len(items))


def _item_order(index: str) -> tuple[bool, int, str]:
    """Numeric indices in numeric order, then any others (a bootstrap's resamples follow the items' order)."""
    return (not index.isdigit(), int(index) if index.isdigit() else 0, index)


def _references(key: RowKey, grid: Grid, base: dict[str, list[RunRecord]],
                ds: str) -> dict[str, list[RunRecord] | str]:
    """The runs a row's cell is compared with: vanilla (every row but vanilla's) and random_pre at the row's
    keep (every row but those two methods'), where the column has them."""
    keep, method, _ = key
    refs: dict[str, list[RunRecord] | str] = {}
    if method != "vanilla" and base.get(ds):
        refs["vanilla"] = base[ds]
    randoms = [k for k in grid if k[1] == "random_pre" and k[0] == keep and grid[k].get(ds)]
    if method not in ("vanilla", "random_pre") and randoms:
        refs["random_pre"] = grid[randoms[0]][ds] if len(randoms) == 1 else \
            f"{len(randoms)} random_pre variants (method params) at keep {keep:g}: no single one to compare with"
    return refs


def _interval_notes(model: str, rows: list[Row], n_resamples: int) -> list[str]:
    """The legend of the ≈ marks compared (with the items paired per column), and why a cell has none."""
    pairs: dict[str, list[int]] = defaultdict(list)
    compared: set[str] = set()
    reasons: dict[tuple[str, str], None] = {}
    for row in rows:
        for ds, cell in row.cells.items():
            for ref, p in cell.paired.items():
                if isinstance(p, Paired):
                    pairs[ds].append(p.pairs)
                    compared.add(ref)
                else:
                    reasons[(ds, p)] = None
    lines = [f"{mark}: {LEGEND[ref]}" for ref, mark in REFERENCES.items() if ref in compared]
    if pairs:
        counts = ", ".join(f"{ds} {min(n)}" + (f"–{max(n)}" if max(n) > min(n) else "")
                           for ds, n in sorted(pairs.items()))
        lines.append(f"intervals: per-item correctness on the items error-free in both runs (seeds averaged per "
                     f"item), {n_resamples} resamples, seed {BOOTSTRAP_SEED}, percentile; items paired: {counts}")
    lines += [f"no paired interval for {model} / {ds}: {reason}" for ds, reason in reasons]
    return lines


# ---------------------------------------------------------------- rows

FLOOR = "blind_floor"


@dataclass
class Cell:
    """One dataset cell of the main table: the scores (one per seed), the change of their mean vs vanilla (%),
    and per reference (REFERENCES) the paired interval, or why there is none."""
    scores: list[float]
    change: float | None = None
    paired: dict[str, Paired | str] = field(default_factory=dict)


@dataclass
class Row:
    """One row of the main table, as numbers: the text, CSV and LaTeX tables are renderings of it."""
    keep: float | None
    name: str  # the method, FLOOR for the blind-floor row
    params: str  # method params as sorted JSON
    label: str  # the method cell: name, params when the method has variants, seeds, marks
    stage: str
    seeds: int | None
    cells: dict[str, Cell]
    avg: float | None = None  # mean score over the datasets the row has
    averaged: int = 0  # how many datasets that is
    partial: bool = False  # fewer than the table has
    rel: float | None = None  # mean relative accuracy, % of vanilla
    prefill: float | None = None  # vanilla's prefill time / the row's
    cross: bool = False  # ... from a separate vanilla run
    flops: float | None = None
    kv: float | None = None
    tokens: dict[str, float | None] = field(default_factory=dict)  # n_visual_out, n_visual_in, layer_avg
    flagged: bool = False
    shadows: bool = False


def _cell(recs: list[RunRecord], base: float | None, is_vanilla: bool, refs: dict[str, list[RunRecord] | str],
          n_resamples: int) -> Cell:
    scores = _scores(recs)
    change = None if is_vanilla or base is None or not scores else (statistics.mean(scores) - base) / base * 100
    if not scores or not n_resamples:
        return Cell(scores, change)
    return Cell(scores, change, {name: ref if isinstance(ref, str) else _compare(recs, ref, n_resamples)
                                 for name, ref in refs.items()})


def _token_means(recs: list[RunRecord]) -> dict[str, float | None]:
    return {name: _mean([float(r.tokens[name]) for r in recs if r.tokens.get(name) is not None])
            for name in ("n_visual_out", "n_visual_in", "layer_avg")}


def _table_row(key: RowKey, grid: Grid, base: dict[str, list[RunRecord]], datasets: list[str], variants: int,
               n_resamples: int) -> Row:
    by_ds, bases, is_vanilla = grid[key], _base_scores(base), key[1] == "vanilla"
    recs = [r for rs in by_ds.values() for r in rs]
    cells = {ds: _cell(by_ds[ds], bases.get(ds), is_vanilla, _references(key, grid, base, ds), n_resamples)
             for ds in datasets if ds in by_ds}
    means = [m for c in cells.values() if (m := _mean(c.scores)) is not None]
    prefill, cross = _speed(by_ds, base, is_vanilla)
    return Row(keep=key[0], name=key[1], params=key[2], label=_method_cell(key, recs, variants),
               stage="/".join(sorted({r.stage for r in recs})), seeds=len({r.seed for r in recs}), cells=cells,
               avg=_mean(means), averaged=len(means), partial=0 < len(means) < len(datasets),
               rel=None if is_vanilla else _rel_accuracy(by_ds, bases), prefill=prefill, cross=cross,
               flops=_speedup(by_ds, base, _prefill_flops), kv=_speedup(by_ds, base, _kv_prefill),
               tokens=_token_means(recs), flagged=any(r.flags for r in recs),
               shadows=any(getattr(r, "shadows", False) for r in recs))


def _floors(recs: list[RunRecord]) -> list[dict]:
    return [r.floor for r in recs if getattr(r, "floor", None)]


def _floor_row(base: dict[str, list[RunRecord]], datasets: list[str]) -> Row | None:
    """`blind floor` row: the vanilla records' shipped floor (zero visual tokens) per dataset."""
    cells = {ds: Cell([statistics.mean(values)]) for ds in datasets
             if (values := [float(f["score"]) for f in _floors(base.get(ds, []))])}
    if not cells:
        return None
    return Row(keep=None, name=FLOOR, params="", label="blind floor (no visual tokens)", stage="", seeds=None,
               cells=cells, tokens={"n_visual_out": 0.0})


def main_rows(records: list[RunRecord], model: str,
              n_resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[Grid, list[str], list[Row]]:
    """The model's main table: its grid, its dataset columns, its rows (the blind floor beside vanilla)."""
    grid = _grid(_latest_per_seed(_complete(records)), model)
    base, datasets = _vanilla(grid), _datasets(grid)
    variants = defaultdict(set)
    for _, method, params in grid:
        variants[method].add(params)
    rows = [_table_row(key, grid, base, datasets, len(variants[key[1]]), n_resamples) for key in grid]
    floor = _floor_row(base, datasets)
    if floor is not None:  # beside vanilla: the scores a model gets without looking
        rows.insert(sum(1 for key in grid if key[1] == "vanilla" and key[0] >= 1.0), floor)
    return grid, datasets, rows


# ---------------------------------------------------------------- cells

def _fmt_score(scores: list[float]) -> str:
    if len(scores) > 1:
        return f"{statistics.mean(scores):.1f} ± {statistics.stdev(scores):.1f}"
    return f"{scores[0]:.1f}"


def _fmt_change(rel: float) -> str:
    if rel == 0:
        return "(=0.0%)"
    return f"({'↑' if rel > 0 else '↓'}{abs(rel):.1f}%)"


def _score_cell(cell: Cell) -> str:
    if not cell.scores:
        return DASH
    text = _fmt_score(cell.scores) + ("" if cell.change is None else f" {_fmt_change(cell.change)}")
    marks = [mark for ref, mark in REFERENCES.items()
             if isinstance(p := cell.paired.get(ref), Paired) and p.indistinguishable]
    return " ".join([text, *marks])


def _avg_cell(row: Row) -> str:
    if row.avg is None:
        return DASH
    text = f"{row.avg:.1f}" + ("†" if row.partial else "")
    return text if row.rel is None else f"{text} (rel. {row.rel:.1f}%)"


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _tokens_cell(row: Row) -> str:
    if row.name == FLOOR:
        return "0"
    n_out, n_in, layer = (row.tokens.get(k) for k in ("n_visual_out", "n_visual_in", "layer_avg"))
    if n_in is None or n_out is None:
        return DASH
    text = f"{_num(n_out)}/{_num(n_in)}"
    if layer is not None and abs(layer - n_out) >= 0.05:
        text += f" (avg {layer:.1f})"
    return text


def _method_cell(key: RowKey, recs: list[RunRecord], variants: int) -> str:
    _, method, params = key
    text = "vanilla (upper bound)" if method == "vanilla" else method
    if variants > 1:
        text += f" {params}"
    seeds = {r.seed for r in recs}
    text += f" ({len(seeds)} seeds)" if len(seeds) > 1 else ""
    text += " ⚑" if any(r.flags for r in recs) else ""
    return text + (" ‡" if any(getattr(r, "shadows", False) for r in recs) else "")


def _text_row(row: Row, datasets: list[str]) -> list[str]:
    cells = [_score_cell(row.cells[ds]) if ds in row.cells else DASH for ds in datasets]
    return [DASH if row.keep is None else str(row.keep), row.label, row.stage or DASH, *cells, _avg_cell(row),
            _ratio_cell(row.prefill, row.cross), _ratio_cell(row.flops), _ratio_cell(row.kv), _tokens_cell(row)]


# ---------------------------------------------------------------- tables

MAIN_COLUMNS = ("keep", "method", "stage", "Avg", "prefill ×", "FLOPs ×", "KV ×", "tokens")  # datasets after stage


def _notes_under(grid: Grid, model: str, bases: dict[str, float], rows: list[Row]) -> list[str]:
    has_vanilla = set(_vanilla(grid))
    lines = [f"no vanilla run for {model} / {ds}: relative scores not shown (run method=vanilla)"
             for ds in _datasets(grid) if ds not in has_vanilla]
    lines += [f"vanilla scores 0 on {model} / {ds}: relative scores are undefined"
              for ds in _datasets(grid) if ds in has_vanilla and ds not in bases]
    if any(row.partial for row in rows):
        lines.append("† Avg is over fewer datasets than the table shows.")
    for (keep, method, _), by_ds in grid.items():
        flags = dict.fromkeys(f for recs in by_ds.values() for r in recs for f in r.flags)
        lines += [f"⚑ {method} keep={keep:g}: {flag}" for flag in flags]
    if any(row.cross for row in rows):
        lines.append(CROSS_RUN)
    if any(row.shadows for row in rows):
        lines.append("‡ the results folder also holds runs of this cell with other settings (another job key: "
                     "position policy, an older record's settings, ...); only the latest is shown")
    return lines


def relative_table(records: list[RunRecord], model: str, fmt: str = "github",
                   n_resamples: int = BOOTSTRAP_RESAMPLES) -> str:
    """The model's score table (relative to vanilla) plus the lines that belong under it; fmt latex: a booktabs
    tabular, the lines under it as LaTeX comments."""
    grid, datasets, rows = main_rows(records, model, n_resamples)
    headers = [*MAIN_COLUMNS[:3], *datasets, *MAIN_COLUMNS[3:]]
    body = [_text_row(row, datasets) for row in rows]
    notes = _interval_notes(model, rows, n_resamples) + _notes_under(grid, model, _base_scores(_vanilla(grid)), rows)
    if fmt == "latex":
        return "\n".join([latex_tabular(headers, body), *(f"% {line}" for line in notes)])
    table = tabulate(body, headers=headers, tablefmt=FORMATS.get(fmt, fmt), disable_numparse=True)
    return "\n\n".join([table, *(["\n".join(notes)] if notes else [])])


# ---------------------------------------------------------------- export: CSV, LaTeX

CSV_HEAD = ("model", "keep", "method", "method_params", "stage", "seeds")
CSV_PER_DATASET = ("score", "std", "change_pct",
                   *(f"vs_{ref}.{f}" for ref in REFERENCES for f in ("diff", "low", "high", "pairs")))
CSV_TAIL = ("avg", "avg_datasets", "avg_rel_pct", "prefill_x", "prefill_cross_run", "flops_x", "kv_x",
            "tokens_out", "tokens_in", "tokens_layer_avg", "flagged", "shadowed")


def _csv_row(model: str, row: Row) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": model, "keep": row.keep, "method": row.name, "method_params": row.params, "stage": row.stage,
        "seeds": row.seeds, "avg": row.avg, "avg_datasets": row.averaged or None, "avg_rel_pct": row.rel,
        "prefill_x": row.prefill, "prefill_cross_run": row.cross if row.prefill is not None else None,
        "flops_x": row.flops, "kv_x": row.kv, "tokens_out": row.tokens.get("n_visual_out"),
        "tokens_in": row.tokens.get("n_visual_in"), "tokens_layer_avg": row.tokens.get("layer_avg"),
        "flagged": row.flagged, "shadowed": row.shadows}
    for ds, cell in row.cells.items():
        if cell.scores:
            out[f"{ds}.score"] = statistics.mean(cell.scores)
            out[f"{ds}.std"] = statistics.stdev(cell.scores) if len(cell.scores) > 1 else None
        out[f"{ds}.change_pct"] = cell.change
        for ref, p in cell.paired.items():
            if isinstance(p, Paired):
                out.update({f"{ds}.vs_{ref}.diff": p.diff, f"{ds}.vs_{ref}.low": p.low,
                            f"{ds}.vs_{ref}.high": p.high, f"{ds}.vs_{ref}.pairs": p.pairs})
    return {k: "" if v is None else v for k, v in out.items()}


def csv_table(records: list[RunRecord], n_resamples: int = BOOTSTRAP_RESAMPLES) -> str:
    """Every model's main table as one CSV: a row per table row, plain numbers (a column each for a cell's
    score, std over seeds, change vs vanilla and paired intervals, `<dataset>.<field>`), blank where none."""
    complete = _complete(records)
    tables = [(model, *main_rows(complete, model, n_resamples)[1:]) for model in _sections(complete)]
    datasets = sorted({ds for _, names, _ in tables for ds in names})
    header = [*CSV_HEAD, *(f"{ds}.{f}" for ds in datasets for f in CSV_PER_DATASET), *CSV_TAIL]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_csv_row(model, row) for model, _, rows in tables for row in rows)
    return out.getvalue()


LATEX_GLYPHS = {"±": r"$\pm$", "↑": r"$\uparrow$", "↓": r"$\downarrow$", "≈": r"$\approx$", "×": r"$\times$",
                "—": "---", "–": "--", "†": r"$^\dagger$", "‡": r"$^\ddagger$", "⚑": r"$^\triangle$",
                "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_cell(text: str) -> str:
    """A cell's text for LaTeX: special characters escaped, the report's glyphs as math symbols (pdflatex-safe)."""
    return "".join(LATEX_GLYPHS.get(c, c) for c in text)


def latex_tabular(headers: list[str], body: list[list[str]]) -> str:
    """A booktabs tabular (\\usepackage{booktabs}): the first three columns left-aligned, the rest right."""
    def line(cells: list[str]) -> str:
        return " & ".join(map(latex_cell, cells)) + r" \\"

    spec = "lll" + "r" * (len(headers) - 3)
    return "\n".join([rf"\begin{{tabular}}{{{spec}}}", r"\toprule", line(headers), r"\midrule",
                      *map(line, body), r"\bottomrule", r"\end{tabular}"])


def latex_tables(records: list[RunRecord], n_resamples: int = BOOTSTRAP_RESAMPLES) -> str:
    """Every model's main table as a booktabs tabular under a `% model` comment, its notes as comments."""
    complete = _complete(records)
    parts = ["\n".join([f"% {model}", *(f"% {line[2:]}" for line in _noise_lines(complete, model)),
                        relative_table(complete, model, "latex", n_resamples)]) for model in _sections(complete)]
    return "\n\n".join(parts or ["% no complete runs yet"]) + "\n"


MEASURED_MARGIN = 25.0  # points above the blind floor for a category to count as measured (issue 6)


def floor_table(records: list[RunRecord], model: str, fmt: str = "github") -> str | None:
    """Per category: vanilla beside the blind floor, and whether the category is measured at all."""
    base = _vanilla(_grid(_latest_per_seed(_complete(records)), model))
    rows = []
    for ds in sorted(base):
        floors = _floors(base[ds])
        if not floors:
            continue
        for cat, low in floors[-1]["metrics"].items():
            van = _mean([float(r.metrics[cat]) for r in base[ds] if cat in r.metrics])
            if van is None:
                continue
            ok = van - float(low) >= MEASURED_MARGIN
            rows.append([ds, cat, f"{van:.1f}", f"{float(low):.1f}", f"{van - float(low):+.1f}",
                         "yes" if ok else f"no (< {MEASURED_MARGIN:.0f} above blind)"])
    if not rows:
        return None
    headers = ["dataset", "category", "vanilla", "blind floor", "margin", "measured"]
    return tabulate(rows, headers=headers, tablefmt=FORMATS.get(fmt, fmt), disable_numparse=True)


def _ms(record: RunRecord, name: str) -> str:
    value = record.timing.get("median", {}).get(name)
    return DASH if value is None else f"{float(value) * 1000:.1f}"


def timing_table(records: list[RunRecord], model: str, fmt: str = "github") -> str:
    """Per-sample median stage times (ms), one row per record of the model."""
    grid = _grid(_latest_per_seed(_complete(records)), model)
    rows = []
    for key, by_ds in grid.items():
        for ds in sorted(by_ds):
            for r in sorted(by_ds[ds], key=lambda r: r.seed):
                method = r.method + (f" (seed {r.seed})" if len(by_ds[ds]) > 1 else "")
                rows.append([method, str(key[0]), ds, *(_ms(r, n) for n in TIMING_COLUMNS),
                             r.timing.get("clock", DASH), r.device.get("name") or DASH])
    headers = ["method", "keep", "dataset", *(n.replace("_s", " ms") for n in TIMING_COLUMNS), "clock", "device"]
    return tabulate(rows, headers=headers, tablefmt=FORMATS.get(fmt, fmt), disable_numparse=True)


EFFICIENCY_COLUMNS = ["method", "keep", "dataset", "batch", "prefill ×", "TTFT ×", "throughput ×", "FLOPs ×",
                      "KV ×", "samples/s", "tokens/s", "pairs"]


def efficiency_table(records: list[RunRecord], model: str, fmt: str = "github") -> str:
    """Per record: the speed ratios to vanilla at the batch size that ran (paired in-process control, else
    cross-run, marked *), FLOPs and KV-cache ratios, and the record's own throughput."""
    grid = _grid(_latest_per_seed(_complete(records)), model)
    base = _vanilla(grid)
    rows = []
    for key, by_ds in grid.items():
        is_vanilla = key[1] == "vanilla"
        for ds in sorted(by_ds):
            for r in sorted(by_ds[ds], key=lambda r: r.seed):
                one = {ds: [r]}
                speeds = [_ratio_cell(*_speed(one, base, is_vanilla, f)) for f in ("prefill_s", "ttft_s", "total_s")]
                paired = (r.timing.get("paired") or {}).get("n_pairs")
                rate, tokens = r.timing.get("samples_per_s"), r.timing.get("tokens_per_s")
                rows.append([r.method + (f" (seed {r.seed})" if len(by_ds[ds]) > 1 else ""), str(key[0]), ds,
                             str(r.batch_size), *speeds, _ratio_cell(_speedup(one, base, _prefill_flops)),
                             _ratio_cell(_speedup(one, base, _kv_prefill)),
                             DASH if rate is None else f"{rate:.3f}", DASH if tokens is None else f"{tokens:.2f}",
                             str(paired) if paired else DASH])
    return tabulate(rows, headers=EFFICIENCY_COLUMNS, tablefmt=FORMATS.get(fmt, fmt), disable_numparse=True)


# ---------------------------------------------------------------- the whole text

def _complete(records: list[RunRecord]) -> list[RunRecord]:
    return [r for r in records if r.status == "complete"]


def _noise_lines(records: list[RunRecord], model: str) -> list[str]:
    notes = [r.notes[0] if r.notes else "accuracy_meaningful is False"
             for r in records if section_of(r) == model and not r.accuracy_meaningful]
    return [f"> accuracy is noise: {n}" for n in dict.fromkeys(notes)]


def _model_section(records: list[RunRecord], model: str, fmt: str, n_resamples: int) -> str:
    head = "\n".join([f"## {model}", *_noise_lines(records, model)])
    floors = floor_table(records, model, fmt)
    extra = [f"### {model}: vanilla vs blind floor per category", floors] if floors else []
    efficiency = efficiency_table(records, model, fmt)
    notes = [CROSS_RUN] if "*" in efficiency else []
    return "\n\n".join([head, relative_table(records, model, fmt, n_resamples), *extra,
                        f"### {model}: per-sample median times (ms)", timing_table(records, model, fmt),
                        f"### {model}: efficiency vs vanilla (× = vanilla / method: > 1 is faster or smaller)",
                        efficiency, *notes])


def _label(r: RunRecord) -> str:
    source = getattr(r, "source", None)
    return str(source) if source else f"{r.model}/{r.dataset}/{r.method} keep={r.keep} seed={r.seed}"


def _incomplete_line(records: list[RunRecord]) -> str | None:
    pending = [r for r in records if r.status not in ("complete", "refused")]
    refused = [r for r in records if r.status == "refused"]
    lines = []
    if pending:
        runs = "run" if len(pending) == 1 else "runs"
        lines.append(f"{len(pending)} {runs} still running/incomplete: " + ", ".join(_label(r) for r in pending))
    if refused:
        runs = "run" if len(refused) == 1 else "runs"
        lines.append(f"{len(refused)} {runs} refused by the model (see the record's notes): "
                     + ", ".join(_label(r) for r in refused))
    return "\n".join(lines) or None


def render(records: list[RunRecord], fmt: str = "github", n_resamples: int = BOOTSTRAP_RESAMPLES) -> str:
    """The full report: one section per model, then a footer for incomplete runs. fmt csv / latex: the main
    tables only (`csv_table`, `latex_tables`), without the footer."""
    if fmt == "csv":
        return csv_table(records, n_resamples)
    if fmt == "latex":
        return latex_tables(records, n_resamples)
    complete = _complete(records)
    models = _sections(complete)
    parts = [_model_section(complete, m, fmt, n_resamples) for m in models] or ["no complete runs yet"]
    footer = _incomplete_line(records)
    return "\n\n".join(parts + ([footer] if footer else [])) + "\n"


# ---------------------------------------------------------------- plot

NO_MATPLOTLIB = "matplotlib is not installed: pip install matplotlib (or pip install -e .[plot])"


def _plot_series(records: list[RunRecord], model: str) -> dict[str, list[tuple[float, float]]]:
    """method -> [(keep, relative accuracy %)] for the model, vanilla excluded."""
    grid = _grid(_latest_per_seed(records), model)
    bases = _base_scores(_vanilla(grid))
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (keep, method, _), by_ds in grid.items():
        rel = _rel_accuracy(by_ds, bases)
        if method != "vanilla" and rel is not None:
            series[method].append((keep, rel))
    return {m: sorted(points) for m, points in sorted(series.items())}


def plot(records: list[RunRecord], out: Path) -> None:
    """One subplot per model: relative accuracy vs keep, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = _complete(records)
    models = _sections(complete)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        _plot_model(ax, complete, model)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _plot_model(ax, records: list[RunRecord], model: str) -> None:
    series = _plot_series(records, model)
    for method, points in series.items():
        ax.plot([k for k, _ in points], [rel for _, rel in points], marker="o", label=method)
    ax.axhline(100, color="gray", linestyle="--", linewidth=1, label="vanilla (keep 1.0)")
    ax.set_xlim(0, 1.05)
    _title(ax, model, _is_noise(records, model))
    ax.set_xlabel("keep (fraction of visual tokens)")
    ax.set_ylabel("relative accuracy vs vanilla (%)")
    if not series:
        ax.text(0.5, 0.5, "no method with a vanilla baseline", ha="center", transform=ax.transAxes)
    ax.legend(fontsize="small")


def _is_noise(records: list[RunRecord], model: str) -> bool:
    """Whether any of the model's records has noise for accuracy (random or untrained weights)."""
    return any(not r.accuracy_meaningful for r in records if section_of(r) == model)


def _title(ax, title: str, noise: bool) -> None:
    ax.set_title(title + ("\n(accuracy is noise)" if noise else ""), color="red" if noise else "black")


# ---------------------------------------------------------------- Pareto fronts: accuracy vs measured cost

# cost axis -> the timing field of its ratio (None: FLOPs) and its label; every cost is vanilla's / the
# method's, so > 1 is cheaper and both coordinates are maximised
COST_AXES = {"prefill": ("prefill_s", "prefill speed-up (vanilla / method)"),
             "ttft": ("ttft_s", "TTFT speed-up (vanilla / method)"),
             "flops": (None, "FLOPs × (vanilla / method, vision + LLM prefill)")}
MARKERS = "osD^vP*Xhp<>"
FRONT = "Pareto front"


@dataclass(frozen=True)
class ParetoPoint:
    """One method x keep of a model on one cost axis: its cost ratio to vanilla (> 1: cheaper), its accuracy (Avg
    relative accuracy %, or one dataset's score) and whether the ratio came from a separate vanilla run."""
    cost: float
    accuracy: float
    method: str  # with its params where the method has variants
    keep: float
    cross: bool = False

    @property
    def label(self) -> str:
        return f"{self.method} keep={self.keep:g}" + ("*" if self.cross else "")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates, both coordinates maximised: q dominates p when
    q >= p in both and > in one; of points equal in both, the first is kept. Swept by x descending (then y
    descending, index ascending): every point seen before p has x >= p's, so p is kept iff its y beats them all."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1], i))
    kept, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            kept.append(i)
            best = points[i][1]
    return sorted(kept)


def _cost(by_ds: dict[str, list[RunRecord]], base: dict[str, list[RunRecord]], is_vanilla: bool,
          axis: str) -> tuple[float | None, bool]:
    """The row's ratio on a cost axis, as the tables compute it: (value, cross-run)."""
    timing_field = COST_AXES[axis][0]
    if timing_field is None:
        return _speedup(by_ds, base, _prefill_flops), False
    return _speed(by_ds, base, is_vanilla, timing_field)


def pareto_points(records: list[RunRecord], model: str, dataset: str | None = None) -> dict[str, list[ParetoPoint]]:
    """Per cost axis with data (COST_AXES order), one point per method x keep of the model, vanilla included (1x):
    the table's ratios (`_speed`: the paired in-process control, else the separate vanilla run, cross; `_speedup`
    of vision + prefill FLOPs) against the Avg relative accuracy, or against `dataset`'s score (a dataset column,
    `dataset_label`; the cost then from that dataset's records alone). Rows without either are left out."""
    grid = _grid(_latest_per_seed(_complete(records)), model)
    base = _vanilla(grid)
    bases = _base_scores(base)
    variants = Counter(method for method, _ in {(method, params) for _, method, params in grid})
    out: dict[str, list[ParetoPoint]] = {axis: [] for axis in COST_AXES}
    for (keep, method, params), by_ds in grid.items():
        if dataset is not None:
            by_ds = {dataset: by_ds[dataset]} if dataset in by_ds else {}
        accuracy = _rel_accuracy(by_ds, bases) if dataset is None else _mean(_scores(by_ds.get(dataset, [])))
        if accuracy is None:
            continue
        name = method + (f" {params}" if variants[method] > 1 else "")
        for axis in COST_AXES:
            cost, cross = _cost(by_ds, base, method == "vanilla", axis)
            if cost:
                out[axis].append(ParetoPoint(cost, accuracy, name, keep, cross))
    return {axis: points for axis, points in out.items() if points}


def pareto_figure(records: list[RunRecord], dataset: str | None = None):
    """A row of panels per model, one per cost axis with data (`pareto_points`); each axes' gid is
    `pareto:<model>:<axis>`, its front the line labelled FRONT. The caller closes the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = _complete(records)
    models = _sections(complete)
    panels = {model: pareto_points(complete, model, dataset) for model in models}
    width = max([len(by_axis) for by_axis in panels.values()] + [1])
    fig, axes = plt.subplots(len(models), width, figsize=(5 * width, 4 * len(models)), squeeze=False)
    ylabel = "relative accuracy vs vanilla (%), Avg" if dataset is None else f"{dataset} score"
    # one marker and colour per method across the whole figure
    names = sorted({p.method for by_axis in panels.values() for points in by_axis.values() for p in points})
    for row, model in zip(axes, models, strict=True):
        noise, by_axis = _is_noise(complete, model), panels[model]
        for ax, (axis, points) in zip(row, by_axis.items(), strict=False):
            ax.set_gid(f"pareto:{model}:{axis}")
            _pareto_panel(ax, points, names, COST_AXES[axis][1], ylabel)
            _title(ax, model, noise)
        if not by_axis:
            _title(row[0], model, noise)
            row[0].text(0.5, 0.5, "no point with both a measured cost and an accuracy", ha="center",
                        transform=row[0].transAxes)
        for ax in row[max(len(by_axis), 1):]:
            ax.set_visible(False)
    fig.tight_layout()
    return fig


def _pareto_panel(ax, points: list[ParetoPoint], names: list[str], xlabel: str, ylabel: str) -> None:
    """The points, a marker per method (faded off the front), the front as a step line, keeps beside points."""
    front = pareto_front([(p.cost, p.accuracy) for p in points])
    for k, name in enumerate(names):
        mine = [p for p in points if p.method == name]
        if mine:
            ax.scatter([p.cost for p in mine], [p.accuracy for p in mine], marker=MARKERS[k % len(MARKERS)],
                       color=f"C{k}", s=30, alpha=0.45, label=name)
        on = [points[i] for i in front if points[i].method == name]
        ax.scatter([p.cost for p in on], [p.accuracy for p in on], marker=MARKERS[k % len(MARKERS)],
                   color=f"C{k}", s=80, edgecolors="black", linewidths=1.2, zorder=3)
    line = sorted((points[i] for i in front), key=lambda p: p.cost)
    # accuracy falls as cost rises along the front: "pre" steps bound the region the front dominates
    ax.step([p.cost for p in line], [p.accuracy for p in line], where="pre", color="black", linewidth=1.2,
            label=FRONT, zorder=2)
    for p in points:
        ax.annotate(f"{p.keep:g}" + ("*" if p.cross else ""), (p.cost, p.accuracy), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=0.8)
    cross = any(p.cross for p in points)
    ax.set_xlabel(xlabel + ("\n* cross-run ratio (no paired vanilla control)" if cross else ""))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small", title="keep beside each point", title_fontsize="x-small")


def pareto_plot(records: list[RunRecord], out: Path, dataset: str | None = None) -> None:
    """Write `pareto_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(records, dataset)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _dataset_columns(records: list[RunRecord]) -> list[str]:
    return sorted({dataset_label(r) for r in _latest_per_seed(_complete(records))})


# ---------------------------------------------------------------- CLI

def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m prunebench.report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_ROOT, help="results folder (default results/)")
    parser.add_argument("--plot", type=Path, metavar="OUT.png", help="also write relative accuracy vs keep")
    parser.add_argument("--pareto", type=Path, metavar="OUT.png",
                        help="also write accuracy vs prefill / TTFT / FLOPs speed-up, the Pareto front joined")
    parser.add_argument("--pareto-dataset", metavar="NAME",
                        help="--pareto's y: this dataset column's score (default: Avg relative accuracy)")
    parser.add_argument("--format", choices=sorted([*FORMATS, *EXPORTS]), default="github",
                        help="table style; csv / latex: the main tables only, for a spreadsheet or a paper")
    parser.add_argument("--resamples", type=_resamples, default=BOOTSTRAP_RESAMPLES, metavar="N",
                        help=f"paired bootstrap resamples behind the ≈v / ≈r marks (default {BOOTSTRAP_RESAMPLES}; "
                             f"0: no intervals)")
    args = parser.parse_args(argv)
    if args.pareto_dataset is not None and args.pareto is None:
        parser.error("--pareto-dataset needs --pareto OUT.png")
    return args


def _resamples(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    records = collect(args.dir) if args.dir.is_dir() else []
    if not records:
        print(f"no {RECORD_NAME} under {args.dir}/ — run python -m prunebench first", file=sys.stderr)
        return 1
    print(render(records, args.format, args.resamples), end="")
    footer = _incomplete_line(records) if args.format in EXPORTS else None
    if footer:  # stdout stays a clean CSV / LaTeX file
        print(footer, file=sys.stderr)
    if not _complete(records):
        return 1
    if args.plot and not _draw(plot, records, args.plot):
        return 1
    if args.pareto:
        columns = _dataset_columns(records)
        if args.pareto_dataset is not None and args.pareto_dataset not in columns:
            print(f"--pareto-dataset {args.pareto_dataset}: no such dataset column; the columns are "
                  + ", ".join(columns), file=sys.stderr)
            return 1
        if not _draw(pareto_plot, records, args.pareto, args.pareto_dataset):
            return 1
    return 0


def _draw(draw: Callable[..., None], records: list[RunRecord], out: Path, *args: Any) -> bool:
    """Write a figure, or say in one line that matplotlib is missing (False)."""
    try:
        draw(records, out, *args)
    except ImportError:
        print(NO_MATPLOTLIB, file=sys.stderr)
        return False
    print(f"wrote {out}", file=sys.stderr)
    return True


if __name__ == "__main__":
    sys.exit(main())
