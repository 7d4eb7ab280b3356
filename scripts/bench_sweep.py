"""Sweep speed (issue 16): the wall time of a 6-job multirun over one job's, and the harness overhead of the
default job (wall minus the generation the records time, over wall).

    OMP_NUM_THREADS=1 python scripts/bench_sweep.py [--limit 20] [--default-limit 500] [--rounds 3]

Each figure runs as a fresh process (imports, model load and teardown included, as a user sees it) into a fresh
results folder, in interleaved rounds; medians are printed. CPU on a shared machine: read the ratios.

The default job's wall splits into a fixed start-up (imports, model load, warm-up, teardown: the same job at
limit=1, less its one timed sample) and a per-sample part; the harness overhead is given for the whole wall and
for the per-sample part alone (what the harness adds to each sample beyond the generation it times).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["-m", "method=random_pre,fastv,divprune", "keep=0.333,0.111"]


def timed(args: list[str], results: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "prunebench", *args, f"results_dir={results}", "report=false"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def generation_seconds(results: Path) -> float:
    """The sum of every timed sample's total_s over the records (method, baseline; paired controls included)."""
    total = 0.0
    for path in results.glob("**/predictions.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            share = max(int(row.get("batch_size") or 1), 1)  # a row's times are its batch's
            total += float((row.get("timing") or {}).get("total_s") or 0.0) / share
            total += float(((row.get("control") or {}).get("timing") or {}).get("total_s") or 0.0) / share
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=20, help="samples per sweep job")
    p.add_argument("--default-limit", type=int, default=500, help="samples of the default job")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    sweep, single, default, startup = [], [], [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, \
                tempfile.TemporaryDirectory() as c, tempfile.TemporaryDirectory() as d:
            sweep.append(timed([*SWEEP, f"limit={args.limit}"], Path(a)))
            single.append(timed(["method=random_pre", "keep=0.333", f"limit={args.limit}"], Path(b)))
            default.append((timed([f"limit={args.default_limit}"], Path(c)), generation_seconds(Path(c))))
            startup.append((timed(["limit=1"], Path(d)), generation_seconds(Path(d))))
    s, o = statistics.median(sweep), statistics.median(single)
    print(f"6-job multirun (+1 baseline), limit={args.limit}: {s:.1f} s; one job (+1 baseline): {o:.1f} s; "
          f"ratio {s / o:.2f} (6 separate processes would be ~6)")
    wall, gen = (statistics.median(x[i] for x in default) for i in (0, 1))
    fixed = statistics.median(w - g for w, g in startup)  # start-up, load, warm-up, teardown; not the timed sample
    per_wall, per_gen = wall - fixed, gen - statistics.median(g for _, g in startup)
    n = args.default_limit
    print(f"default job, limit={n} (+ its vanilla baseline): wall {wall:.1f} s, timed generation {gen:.1f} s: "
          f"harness overhead {100 * (1 - gen / wall):.1f} % of wall (imports, load and teardown included)")
    print(f"  fixed start-up (limit=1 wall less its timed sample: imports, load, warm-up, teardown): {fixed:.1f} s; "
          f"per sample: {1e3 * per_wall / (2 * n - 2):.2f} ms wall, {1e3 * per_gen / (2 * n - 2):.2f} ms timed: "
          f"harness overhead {100 * (1 - per_gen / per_wall):.1f} % of the per-sample wall")
    print(f"medians of {args.rounds} interleaved rounds; raw sweep {sweep}, single {single}, default {default}, "
          f"limit=1 {startup}")


if __name__ == "__main__":
    main()
