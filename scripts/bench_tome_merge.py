"""ToMe merge step: ours (`tome_ops.tome_merge`) vs an independent transcription of the official
`bipartite_soft_matching` + `merge_wavg` (facebookresearch/ToMe tome/merge.py) on the same inputs.

One thread, warm-up excluded, interleaved repeats; prints the medians and ours/official. Not a test.
Usage: python scripts/bench_tome_merge.py [--tokens 577] [--dim 1024] [--r 22] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunebench.methods.tome_ops import tome_merge


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=577)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--r", type=int, default=22)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    b, t = args.batch, args.tokens
    x = torch.randn(b, t, args.dim, generator=g)
    metric = torch.randn(b, t, args.head_dim, generator=g)
    size = torch.ones(b, t)
    rep = torch.arange(t).expand(b, t).clone()
    protect = torch.zeros(b, t, dtype=torch.bool)
    protect[:, 0] = True  # [CLS]

    def ours() -> None:
        tome_merge(x, size, rep, None, args.r, metric=metric, protect=protect)

    def official() -> None:
        official_merge(x, size[..., None], metric, args.r)

    with torch.no_grad():
        for _ in range(10):  # warm-up
            ours(), official()
        t_ours, t_off = [], []
        for _ in range(args.repeats):  # interleaved
            t_ours.append(timed(ours))
            t_off.append(timed(official))
    m_ours, m_off = statistics.median(t_ours), statistics.median(t_off)
    print(f"B={b} T={t} D={args.dim} r={args.r} threads=1 repeats={args.repeats}")
    print(f"ours     median {m_ours * 1e6:9.1f} us")
    print(f"official median {m_off * 1e6:9.1f} us")
    print(f"ours/official   {m_ours / m_off:9.3f}")


if __name__ == "__main__":
    main()
