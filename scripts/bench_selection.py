"""Selection cost at image and video scale (issue 16): every select method's own time at N visual tokens, beside
the cost of one N x N cosine-similarity matrix (the floor of any method comparing all tokens).

    OMP_NUM_THREADS=1 python scripts/bench_selection.py                      # N = 576, 2880, 10816; D = 4096
    python scripts/bench_selection.py --sizes 576 2880 --dim 1024 --methods divprune gprune vispruner

Inputs are synthetic (random tokens and signals of the documented shapes, `methods/base.py` SIGNALS): the time
of a selection depends on shapes, not values. k = round(keep * N), keep = 0.111 (1,200 of 10,816). fp32, medians
of --runs after one warm-up. Methods whose signals are a whole prompt's attention rows (MustDrop, SparseVLM) and
the encoder merges (EvoPrune, ToMe: timed inside the ViT by bench_prefill) are not synthesised here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunebench.methods import METHODS, SelectContext, Stage, resolve_method  # noqa: E402

TEXT, HEADS = 32, 8  # text tokens after the image, key width per head x heads


def signals(needs: frozenset[str], n: int, d: int, g: torch.Generator) -> dict[str, torch.Tensor] | None:
    """Random signals of the documented shapes for one image of n tokens (batch 1); None = not synthesised."""
    length = n + TEXT + 8  # the prompt: a short prefix, the image, the question
    rows = torch.arange(8, 8 + n)[None]
    made = {
        "cls_attention": lambda: torch.rand(1, n, generator=g).softmax(-1),
        "cls_attention_full": lambda: torch.rand(1, n, generator=g).softmax(-1),
        "cls_keys": lambda: torch.randn(1, n, 64, generator=g),
        "cls_keys_full": lambda: torch.randn(1, n, 1024, generator=g),
        "vision_features": lambda: torch.randn(1, n, 1024, generator=g),
        "text_embeddings": lambda: torch.randn(1, TEXT, d, generator=g),
        "last_query_attention": lambda: torch.rand(1, n, generator=g),
        "layer_last_query_attention": lambda: torch.rand(1, n, generator=g),
        "last_visual_query_attention": lambda: torch.rand(1, n, generator=g),
        "last_token_hidden": lambda: torch.randn(1, d, generator=g),
        "layer_keys": lambda: torch.randn(1, length, HEADS * 128, generator=g),
        "normed_hidden": lambda: torch.randn(1, length, d, generator=g),
        "visual_rows": lambda: rows,
        "sequence_index": lambda: torch.arange(length)[None],
        "text_after_visual": lambda: torch.arange(length)[None] >= 8 + n,
    }
    wanted = needs - {"grid", "projector_input"}
    if not wanted <= set(made):
        return None
    return {name: made[name]() for name in wanted}


def grid_of(n: int) -> tuple[int, int]:
    """The most square (h, w) with h * w = n (576: 24 x 24; 2,880: 48 x 60; 10,816: 104 x 104)."""
    h = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return h, n // h


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[576, 2880, 10816])
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--keep", type=float, default=0.111)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--methods", nargs="*", default=None, help="default: every select method it can synthesise")
    args = p.parse_args()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    names = args.methods or [n for n in METHODS.names()
                             if METHODS.get(n).fn is not None and METHODS.get(n).stage in (Stage.PRE_LLM, Stage.INTRA_LLM)]
    print(f"D={args.dim}, keep={args.keep}, fp32, {torch.get_num_threads()} thread(s), medians of {args.runs}")
    print(f"{'method':<16}" + "".join(f"{f'N={n} ms':>14}{'x matrix':>10}" for n in args.sizes))
    g = torch.Generator().manual_seed(0)
    tokens = {n: torch.randn(1, n, args.dim, generator=g) for n in args.sizes}
    grids = {n: grid_of(n) for n in args.sizes}

    def matrix(x: torch.Tensor) -> torch.Tensor:
        u = torch.nn.functional.normalize(x, dim=-1)
        return u @ u.transpose(1, 2)

    base = {n: median_time(lambda n=n: matrix(tokens[n]), args.runs) for n in args.sizes}
    print(f"{'cosine matrix':<16}" + "".join(f"{base[n] * 1e3:14.1f}{1.0:10.2f}" for n in args.sizes))
    for name in names:
        method = resolve_method(name)
        cells = []
        for n in args.sizes:
            sig = signals(method.spec.needs, n, args.dim, g)
            if sig is None:
                cells.append(f"{'(signals not synthesised)':>24}")
                break
            ctx = SelectContext(tokens=tokens[n], n_keep=max(1, round(args.keep * n)), grid=grids[n],
                                generator=torch.Generator().manual_seed(0), signals=sig, keep=args.keep)
            try:
                t = median_time(lambda ctx=ctx, m=method: m.spec.fn(ctx, **m.params), args.runs)
            except Exception as err:  # noqa: BLE001 - a benchmark row, not a crash
                cells.append(f"  {type(err).__name__}: {str(err)[:60]}")
                break
            cells.append(f"{t * 1e3:14.1f}{t / base[n]:10.2f}")
        print(f"{name:<16}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
