"""Turn the `record.json` files under a results folder into per-model tables (and a plot).

    python -m prunebench.report [DIR] [--plot OUT.png] [--format markdown|github|plain]

Scores are shown beside their relative change vs the vanilla run of the same model and
dataset; a dataset with no complete vanilla run gets bare scores and a line saying so (a
baseline is never guessed). `Avg` carries the mean relative accuracy (score / vanilla x 100,
averaged over datasets) as in UniPruneBench; records that differ only by seed are shown as
`mean ± std` (sample std), UniPruneBench Table 1 style.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tabulate import tabulate

from prunebench.record import RECORD_NAME, RunRecord, load_record

DEFAULT_ROOT = Path("results")
FORMATS = {"markdown": "pipe", "github": "github", "plain": "plain"}
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


# ---------------------------------------------------------------- cells

def _fmt_score(scores: list[float]) -> str:
    if len(scores) > 1:
        return f"{statistics.mean(scores):.1f} ± {statistics.stdev(scores):.1f}"
    return f"{scores[0]:.1f}"


def _fmt_change(score: float, base: float) -> str:
    rel = (score - base) / base * 100
    if rel == 0:
        return "(=0.0%)"
    return f"({'↑' if rel > 0 else '↓'}{abs(rel):.1f}%)"


def _score_cell(recs: list[RunRecord], base: float | None, is_vanilla: bool) -> str:
    scores = _scores(recs)
    if not scores:
        return DASH
    text = _fmt_score(scores)
    if is_vanilla or base is None:
        return text
    return f"{text} {_fmt_change(statistics.mean(scores), base)}"


def _avg_cell(by_ds: dict[str, list[RunRecord]], bases: dict[str, float], is_vanilla: bool,
              n_datasets: int) -> str:
    means = [m for recs in by_ds.values() if (m := _mean(_scores(recs))) is not None]
    if not means:
        return DASH
    text = f"{_mean(means):.1f}" + ("†" if len(means) < n_datasets else "")
    rel = None if is_vanilla else _rel_accuracy(by_ds, bases)
    return text if rel is None else f"{text} (rel. {rel:.1f}%)"


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _tokens_cell(recs: list[RunRecord]) -> str:
    def avg(name: str) -> float | None:
        return _mean([float(r.tokens[name]) for r in recs if r.tokens.get(name) is not None])

    n_in, n_out, layer = avg("n_visual_in"), avg("n_visual_out"), avg("layer_avg")
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


# ---------------------------------------------------------------- tables

def _table_row(key: RowKey, by_ds: dict[str, list[RunRecord]], base: dict[str, list[RunRecord]],
               datasets: list[str], variants: int) -> list[str]:
    bases = _base_scores(base)
    is_vanilla = key[1] == "vanilla"
    recs = [r for rs in by_ds.values() for r in rs]
    stage = "/".join(sorted({r.stage for r in recs})) or DASH
    cells = [_score_cell(by_ds[ds], bases.get(ds), is_vanilla) if ds in by_ds else DASH for ds in datasets]
    speed, kv, flops = _speed(by_ds, base, is_vanilla), _speedup(by_ds, base, _kv_prefill), \
        _speedup(by_ds, base, _prefill_flops)
    return [str(key[0]), _method_cell(key, recs, variants), stage, *cells,
            _avg_cell(by_ds, bases, is_vanilla, len(datasets)), _ratio_cell(*speed),
            _ratio_cell(flops), _ratio_cell(kv), _tokens_cell(recs)]


def _notes_under(grid: Grid, model: str, bases: dict[str, float], rows: list[list[str]]) -> list[str]:
    has_vanilla = set(_vanilla(grid))
    lines = [f"no vanilla run for {model} / {ds}: relative scores not shown (run method=vanilla)"
             for ds in _datasets(grid) if ds not in has_vanilla]
    lines += [f"vanilla scores 0 on {model} / {ds}: relative scores are undefined"
              for ds in _datasets(grid) if ds in has_vanilla and ds not in bases]
    if any("†" in row[-5] for row in rows):
        lines.append("† Avg is over fewer datasets than the table shows.")
    for (keep, method, _), by_ds in grid.items():
        flags = dict.fromkeys(f for recs in by_ds.values() for r in recs for f in r.flags)
        lines += [f"⚑ {method} keep={keep:g}: {flag}" for flag in flags]
    if any(row[-4].endswith("*") for row in rows):
        lines.append(CROSS_RUN)
    if any(getattr(r, "shadows", False) for by_ds in grid.values() for recs in by_ds.values() for r in recs):
        lines.append("‡ the results folder also holds runs of this cell with other settings (another job key: "
                     "position policy, an older record's settings, ...); only the latest is shown")
    return lines


def relative_table(records: list[RunRecord], model: str, fmt: str = "github") -> str:
    """The model's score table (relative to vanilla) plus the lines that belong under it."""
    grid = _grid(_latest_per_seed(_complete(records)), model)
    base, datasets = _vanilla(grid), _datasets(grid)
    variants = defaultdict(set)
    for _, method, params in grid:
        variants[method].add(params)
    rows = [_table_row(key, by_ds, base, datasets, len(variants[key[1]])) for key, by_ds in grid.items()]
    floor = _floor_row(base, datasets)
    if floor is not None:  # beside vanilla: the scores a model gets without looking
        at = sum(1 for key in grid if key[1] == "vanilla" and key[0] >= 1.0)
        rows.insert(at, floor)
    headers = ["keep", "method", "stage", *datasets, "Avg", "prefill ×", "FLOPs ×", "KV ×", "tokens"]
    table = tabulate(rows, headers=headers, tablefmt=FORMATS.get(fmt, fmt), disable_numparse=True)
    notes = _notes_under(grid, model, _base_scores(base), rows)
    return "\n\n".join([table, *(["\n".join(notes)] if notes else [])])


def _floors(recs: list[RunRecord]) -> list[dict]:
    return [r.floor for r in recs if getattr(r, "floor", None)]


def _floor_row(base: dict[str, list[RunRecord]], datasets: list[str]) -> list[str] | None:
    """`blind floor` row: the vanilla records' shipped floor (zero visual tokens) per dataset."""
    cells = []
    for ds in datasets:
        values = [float(f["score"]) for f in _floors(base.get(ds, []))]
        cells.append(f"{_mean(values):.1f}" if values else DASH)
    if all(c == DASH for c in cells):
        return None
    return [DASH, "blind floor (no visual tokens)", DASH, *cells, DASH, DASH, DASH, DASH, "0"]


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


def _model_section(records: list[RunRecord], model: str, fmt: str) -> str:
    head = "\n".join([f"## {model}", *_noise_lines(records, model)])
    floors = floor_table(records, model, fmt)
    extra = [f"### {model}: vanilla vs blind floor per category", floors] if floors else []
    efficiency = efficiency_table(records, model, fmt)
    notes = [CROSS_RUN] if "*" in efficiency else []
    return "\n\n".join([head, relative_table(records, model, fmt), *extra,
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


def render(records: list[RunRecord], fmt: str = "github") -> str:
    """The full report: one section per model, then a footer for incomplete runs."""
    complete = _complete(records)
    models = _sections(complete)
    parts = [_model_section(complete, m, fmt) for m in models] or ["no complete runs yet"]
    footer = _incomplete_line(records)
    return "\n\n".join(parts + ([footer] if footer else [])) + "\n"


# ---------------------------------------------------------------- plot

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
    noise = any(not r.accuracy_meaningful for r in records if section_of(r) == model)
    ax.set_title(model + ("\n(accuracy is noise)" if noise else ""), color="red" if noise else "black")
    ax.set_xlabel("keep (fraction of visual tokens)")
    ax.set_ylabel("relative accuracy vs vanilla (%)")
    if not series:
        ax.text(0.5, 0.5, "no method with a vanilla baseline", ha="center", transform=ax.transAxes)
    ax.legend(fontsize="small")


# ---------------------------------------------------------------- CLI

def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m prunebench.report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_ROOT, help="results folder (default results/)")
    parser.add_argument("--plot", type=Path, metavar="OUT.png", help="also write relative accuracy vs keep")
    parser.add_argument("--format", choices=sorted(FORMATS), default="github", help="table style")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    records = collect(args.dir) if args.dir.is_dir() else []
    if not records:
        print(f"no {RECORD_NAME} under {args.dir}/ — run python -m prunebench first", file=sys.stderr)
        return 1
    print(render(records, args.format), end="")
    if not _complete(records):
        return 1
    if args.plot:
        try:
            plot(records, args.plot)
        except ImportError:
            print("matplotlib is not installed: pip install matplotlib (or pip install -e .[plot])",
                  file=sys.stderr)
            return 1
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
