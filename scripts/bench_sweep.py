"""Sweep speed (issue 16): the wall time of a 6-job multirun over one job's, and the harness overhead of the
default job (wall minus the generation the records time, over wall).

    OMP_NUM_THREADS=1 python scripts/bench_sweep.py [--limit 20] [--default-limit 500] [--rounds 3]

Each figure runs as a fresh process (imports, model load and teardown included, as a user sees it) into a fresh
results folder, in interleaved rounds; medians are printed. CPU on a shared machine: read the ratios.

The default job's wall splits into a fixed start-up (imports, model load, warm-up, teardown: the same job at
limit=1, less its one timed sample) and a per-sample part; the harness overhead is given for the whole wall and
for the per-sample part alone (what the harness adds to each sample beyond the generation it times).

The floor (`--floor N`, run as its own process in each round): a plain HF script doing the default job's
generations and nothing else: import torch and transformers, load the probe, run the processor once per item
and `generate` each item twice (the job and its vanilla baseline), timing each `generate`; it freezes the heap at
exit as prunebench does, so teardown is not credited to the harness. Its wall less its timed generation is what
any Python program pays for these generations; the harness's own overhead is the default job's overhead less
the floor's, over the job's wall.
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


def floor(n: int) -> None:
    """The plain HF loop over the default job's model and items (prints its timed generation seconds)."""
    import gc

    import torch
    import yaml
    from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration

    from prunebench.data.probe import build_probe

    model_cfg = yaml.safe_load((REPO / "configs/model/probe_llava.yaml").read_text())
    data = yaml.safe_load((REPO / "configs/dataset/probe.yaml").read_text())
    torch.set_num_threads(1)
    path = str(REPO / model_cfg["path"])
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation=model_cfg["attn_implementation"]).eval()
    items = build_probe(data["n"], seed=data["seed"], image_size=data["image_size"], families=data["families"])[:n]
    tok = processor.tokenizer
    gen = GenerationConfig(max_new_tokens=data["max_new_tokens"], do_sample=False, num_beams=1,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           bos_token_id=tok.bos_token_id)
    timed = 0.0
    for item in items:
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}],
            add_generation_prompt=True)
        inputs = processor(text=prompt, images=item.image, return_tensors="pt")
        for _ in range(2):  # the job and its vanilla baseline
            with torch.inference_mode():
                start = time.perf_counter()
                out = model.generate(**inputs, generation_config=gen)
                timed += time.perf_counter() - start
            tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(json.dumps({"timed_s": timed}))
    gc.freeze()


def timed_floor(n: int) -> tuple[float, float]:
    """(wall, timed generation) of the floor as its own process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--floor", str(n)], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    return wall, float(json.loads(out.strip().splitlines()[-1])["timed_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=20, help="samples per sweep job")
    p.add_argument("--default-limit", type=int, default=500, help="samples of the default job")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--floor", type=int, metavar="N", help="run only the plain HF floor over N items (internal)")
    args = p.parse_args()
    if args.floor is not None:
        return floor(args.floor)
    sweep, single, default, startup, floors = [], [], [], [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, \
                tempfile.TemporaryDirectory() as c, tempfile.TemporaryDirectory() as d:
            sweep.append(timed([*SWEEP, f"limit={args.limit}"], Path(a)))
            single.append(timed(["method=random_pre", "keep=0.333", f"limit={args.limit}"], Path(b)))
            default.append((timed([f"limit={args.default_limit}"], Path(c)), generation_seconds(Path(c))))
            startup.append((timed(["limit=1"], Path(d)), generation_seconds(Path(d))))
            floors.append(timed_floor(args.default_limit))
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
    f_wall, f_gen = (statistics.median(x[i] for x in floors) for i in (0, 1))
    own = statistics.median((w - g) - (fw - fg) for (w, g), (fw, fg) in zip(default, floors, strict=True))
    print(f"  floor (a plain HF loop: imports, load, processor once per item, the same {2 * n} generate calls): "
          f"wall {f_wall:.1f} s, timed {f_gen:.1f} s, overhead {f_wall - f_gen:.1f} s; the harness's own overhead "
          f"(the job's less the floor's, paired per round): {own:.2f} s = {100 * own / wall:.1f} % of the job's wall")
    print(f"medians of {args.rounds} interleaved rounds; raw sweep {sweep}, single {single}, default {default}, "
          f"limit=1 {startup}, floor {floors}")


if __name__ == "__main__":
    main()
