"""Benchmark (not a test): batched throughput of vanilla and pruned generation on the mid-size random LLaVA.

    python scripts/bench_throughput.py                                 # CPU, 1 thread, batch 1 / 4 / 16
    python scripts/bench_throughput.py --methods random_pre fastv --keep 0.111 --repeats 5
    python scripts/bench_throughput.py --device cuda --samples 64 --batches 1 4 16 32

The model and prompt are `scripts/bench_prefill.py`'s (CLIP 12x768 at 336 px -> 576 visual tokens, Llama 8x1024,
random weights: shapes are what matter for time). --samples distinct prompts (questions of different lengths, so
batches are left-padded; images of different colours) run through the runner's own timed path
(`generation.generate_batch_timed`, hooks and timer as in a job; CUDA events on a GPU) in batches of each size,
generating --new-tokens tokens each (min = max, so every configuration generates the same tokens). One pass =
every sample once at one (method, batch size); passes are interleaved over --repeats rounds, in a rotating
order, and each configuration's median pass is printed:

    samples/s, generated tokens/s,  × vanilla (same batch size),  × batch 1 (same method)

On CPU use one thread: the cores are shared, absolute times are noisy, ratios are what to read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's prunebench
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prefill import mid_size_llava  # noqa: E402

from prunebench.families.llava import llava_seams  # noqa: E402
from prunebench.fixtures.tiny import build_processor  # noqa: E402
from prunebench.generation import generate_batch_timed  # noqa: E402
from prunebench.measure import instrument  # noqa: E402
from prunebench.methods import resolve_method  # noqa: E402
from prunebench.models.loader import LoadedModel  # noqa: E402
from prunebench.stages import batch_refusal, install  # noqa: E402
from prunebench.timing import Timer  # noqa: E402

QUESTIONS = ["What color is the square?", "Describe the picture in one word.",
             "Is there anything red in this image? Answer yes or no.", "Which shape do you see here, and where?"]


def prompts(processor, n: int, device: torch.device) -> list[dict]:
    out = []
    for i in range(n):
        conv = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]
        colour = ((37 * i) % 256, (91 * i + 60) % 256, (53 * i + 120) % 256)
        out.append({"text": processor.apply_chat_template(conv, add_generation_prompt=True),
                    "image": Image.new("RGB", (336, 336), colour)})
    return out


def batch_inputs(processor, items: list[dict], device: torch.device):
    if len(items) == 1:
        return processor(text=items[0]["text"], images=items[0]["image"], return_tensors="pt").to(device)
    return processor(text=[s["text"] for s in items], images=[s["image"] for s in items], return_tensors="pt",
                     padding=True, padding_side="left").to(device)


def one_pass(loaded: LoadedModel, inst, timer: Timer, batches: list, new_tokens: int) -> tuple[float, int]:
    """Every sample once: (seconds, generated tokens), from the runner's per-batch timing."""
    seconds, tokens = 0.0, 0
    for first, inputs in batches:
        rows = generate_batch_timed(loaded, inputs, inst, timer, list(range(first, first + inputs["input_ids"].shape[0])),
                                    new_tokens)
        seconds += rows[0]["timing"]["total_s"]
        tokens += sum(r["n_new_tokens"] for r in rows)
    return seconds, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["random_pre", "fastv"], help="pruning methods beside vanilla")
    ap.add_argument("--keep", type=float, default=0.111)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--samples", type=int, default=16, help="prompts per pass (a multiple of every batch size)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if any(args.samples % b for b in args.batches):
        ap.error(f"--samples {args.samples} must be a multiple of every batch size {args.batches}")
    for name in args.methods:
        refusal = batch_refusal(resolve_method(name))
        if refusal is not None:
            ap.error(f"{name} cannot batch: {refusal}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    processor = build_processor(336, 14)
    tok = processor.tokenizer
    tok.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = mid_size_llava(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id).to(device)
    # the same number of tokens for every configuration: end-of-sequence never stops a random-weight model early
    model.generation_config.min_new_tokens = args.new_tokens
    seams = llava_seams(model)
    loaded = LoadedModel(name="mid-size random LLaVA", model=model, processor=processor, seams=seams, device=device,
                         dtype=torch.float32, weights="random", source="scripts/bench_prefill.py", untrained=True)
    items = prompts(processor, args.samples, device)
    grouped = {b: [(i, batch_inputs(processor, items[i : i + b], device)) for i in range(0, args.samples, b)]
               for b in args.batches}
    configs = [("vanilla", 1.0, b) for b in args.batches]
    configs += [(m, args.keep, b) for m in args.methods for b in args.batches]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} threads={torch.get_num_threads()} samples={args.samples} new_tokens={args.new_tokens} "
          f"repeats={args.repeats} keep={args.keep} (median pass, interleaved)", file=sys.stderr)

    timer = Timer(device)
    passes: dict[tuple, list[tuple[float, int]]] = {c: [] for c in configs}
    with instrument(model, seams, timer):
        for method, keep, b in configs:  # untimed warm-up: one batch per configuration
            with install(seams, resolve_method(method), keep, seed=0, timer=timer) as inst:
                one_pass(loaded, inst, timer, grouped[b][:1], args.new_tokens)
        for r in range(args.repeats):
            for c in configs[r % len(configs):] + configs[: r % len(configs)]:
                method, keep, b = c
                with install(seams, resolve_method(method), keep, seed=0, timer=timer) as inst:
                    passes[c].append(one_pass(loaded, inst, timer, grouped[b], args.new_tokens))
                print(f"  round {r + 1}/{args.repeats} {method} batch {b}: {passes[c][-1][0]:.2f} s", file=sys.stderr)

    rate = {c: args.samples / statistics.median(s for s, _ in passes[c]) for c in configs}
    tokens = {c: passes[c][0][1] / statistics.median(s for s, _ in passes[c]) for c in configs}
    print(f"{'method':<12} {'keep':>6} {'batch':>5} {'samples/s':>10} {'tokens/s':>9} {'× vanilla':>10} "
          f"{'× batch 1':>10}")
    for method, keep, b in configs:
        c = (method, keep, b)
        vs_vanilla = rate[c] / rate[("vanilla", 1.0, b)]
        first = (method, keep, args.batches[0])
        print(f"{method:<12} {keep:6.3f} {b:5d} {rate[c]:10.3f} {tokens[c]:9.2f} {vs_vanilla:10.2f} "
              f"{rate[c] / rate[first]:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
