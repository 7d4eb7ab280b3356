"""How long a real-size `weights=random` build takes (issue 16, item 6): the tiled init (`model.random_init=tiled`,
the default) against transformers' full random init (`full`), each in a fresh process, interleaved.

    OMP_NUM_THREADS=1 python scripts/bench_random_build.py [--model llava15] [--dtype bfloat16] [--rounds 2] [--tiled-only]

Prints the median seconds of `load_model` (construction, init, processor) per mode. CPU on a shared machine:
read the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time, torch
from prunebench.checks import yaml_defaults
from prunebench.models.loader import load_model
cfg = {**yaml_defaults("model", sys.argv[1]), "weights": "random", "dtype": sys.argv[2], "random_init": sys.argv[3]}
start = time.perf_counter()
loaded = load_model(cfg, torch.device("cpu"))
seconds = time.perf_counter() - start
print(json.dumps({"s": seconds, "params": sum(p.numel() for p in loaded.model.parameters())}))
"""


def build(model: str, dtype: str, how: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, model, dtype, how], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llava15", help="a model config with a shipped architecture")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tiled-only", action="store_true", help="skip the (slow) full init")
    args = p.parse_args()
    modes = ["tiled"] if args.tiled_only else ["tiled", "full"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    params = 0
    for _ in range(args.rounds):
        for how in modes:
            result = build(args.model, args.dtype, how)
            times[how].append(result["s"])
            params = result["params"]
    line = ", ".join(f"{m} {statistics.median(v):.1f} s" for m, v in times.items())
    ratio = f"; full / tiled {statistics.median(times['full']) / statistics.median(times['tiled']):.1f}x" \
        if "full" in times else ""
    print(f"{args.model} weights=random {args.dtype} ({params / 1e9:.2f} B parameters), load_model: {line}{ratio} "
          f"(medians of {args.rounds}; raw {times})")


if __name__ == "__main__":
    main()
