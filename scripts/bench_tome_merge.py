"""ToMe merge step: ours (`tome_ops.tome_merge`) vs an independent transcription of the official
`bipartite_soft_matching` + `merge_wavg` (facebookresearch/ToMe tome/merge.py) on the same inputs.

One thread, warm-up excluded, interleaved repeats; prints one row per size: the medians and ours/official.
Not a test. Index 0 is a protected [CLS] in both.
Usage: python scripts/bench_tome_merge.py [--sizes 577,1024,22 729,1152,32 577,1024,22,4] [--repeats 200]
       python scripts/bench_tome_merge.py --tokens 729 --dim 1152 --r 32 [--batch 1]   (one size)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not whichever one is installed

from prunebench.methods.tome_ops import tome_merge  # noqa: E402

# (tokens, dim, r, batch): CLIP ViT-L/14-336 ([CLS] + 24x24) at ToMe's r, SigLIP so400m (27x27), a batch
DEFAULT_SIZES = ((577, 1024, 22, 1), (729, 1152, 32, 1), (577, 1024, 22, 4))


def official_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int) -> tuple[torch.Tensor, ...]:
    """Transcription of ToMe's bipartite_soft_matching(class_token=True) + merge_wavg; size [B, T, 1]."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -float("inf")
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    x = merge(x * size)
    size = merge(size)
    return x / size, size


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def size_arg(text: str) -> tuple[int, int, int, int]:
    """"T,D,r[,B]" -> (T, D, r, B), B defaulting to 1."""
    parts = [int(v) for v in text.split(",")]
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"a size is T,D,r[,B], got {text!r}")
    return (*parts, 1) if len(parts) == 3 else tuple(parts)


def bench_size(tokens: int, dim: int, r: int, batch: int, head_dim: int, repeats: int) -> tuple[float, float]:
    """Median seconds of (ours, official) for one size."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, dim, generator=g)
    metric = torch.randn(batch, tokens, head_dim, generator=g)
    size = torch.ones(batch, tokens)
    rep = torch.arange(tokens).expand(batch, tokens).clone()
    protect = torch.zeros(batch, tokens, dtype=torch.bool)
    protect[:, 0] = True  # [CLS]

    def ours() -> None:
        tome_merge(x, size, rep, None, r, metric=metric, protect=protect)

    def official() -> None:
        official_merge(x, size[..., None], metric, r)

    with torch.no_grad():
        for _ in range(10):  # warm-up
            ours(), official()
        t_ours, t_off = [], []
        for _ in range(repeats):  # interleaved
            t_ours.append(timed(ours))
            t_off.append(timed(official))
    return statistics.median(t_ours), statistics.median(t_off)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=size_arg, nargs="+", default=list(DEFAULT_SIZES), help="T,D,r[,B] each")
    p.add_argument("--tokens", type=int, help="one size: T (with --dim, --r, --batch)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--r", type=int, default=22)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    sizes = [(args.tokens, args.dim, args.r, args.batch)] if args.tokens else args.sizes
    torch.set_num_threads(1)
    results = [(s, bench_size(*s, args.head_dim, args.repeats)) for s in sizes]
    print(f"threads=1 repeats={args.repeats} head_dim={args.head_dim}  (medians, us)")
    print(f"{'B':>3} {'T':>5} {'D':>5} {'r':>4} {'ours':>9} {'official':>9} {'ours/off':>9}")
    for (t, d, r, b), (m_ours, m_off) in results:
        print(f"{b:3d} {t:5d} {d:5d} {r:4d} {m_ours * 1e6:9.1f} {m_off * 1e6:9.1f} {m_ours / m_off:9.3f}")


if __name__ == "__main__":
    main()
