"""The prepared GPU check (issue 16): real-size `weights=random` bf16 builds of LLaVA-1.5-7B, Qwen2.5-VL-7B,
InternVL3-8B and a LLaVA-OneVision-7B video, vanilla and FastV / DivPrune / EvoPrune at keep 0.111, SDPA (and
FlashAttention-2 when it is installed), CUDA-event timing, a few samples each -> one markdown table.

    python scripts/gpu_check.py                # on the GPU machine (make gpu-check): docs/gpu_check.md
    python scripts/gpu_check.py --dry          # the same path on CPU with the tiny checkpoints (CI)

Random weights: accuracy is noise and the table has none; token counts, times, FLOPs and KV bytes are the
point. Jobs of one model share one load (`resident_model`); each job's record stays under --results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (model config, dataset, its overrides) for the real check, and the tiny stand-ins of the dry run
REAL = [("llava15", "shapes", {}), ("qwen25vl_7b", "shapes", {}), ("internvl3_8b", "shapes", {}),
        ("llava_ov_7b", "shapes_video", {"dataset.num_frames": 16})]
DRY = [("tiny_llava", "shapes", {}), ("tiny_qwen25vl", "shapes", {}), ("tiny_internvl", "shapes", {}),
       ("tiny_onevision", "shapes_video", {"dataset.num_frames": 4, "dataset.source_frames": 8})]
METHODS = ("vanilla", "fastv", "divprune", "evoprune")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="tiny checkpoints on CPU (the CI run of this script)")
    p.add_argument("--keep", type=float, default=0.111)
    p.add_argument("--limit", type=int, default=4, help="samples per job (after 1 warm-up)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "gpu_check.md")
    p.add_argument("--results", type=Path, default=REPO / "results" / "gpu_check")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting jobs after this many seconds")
    return p.parse_args(argv)


def attentions() -> list[str]:
    """SDPA always; FlashAttention-2 where the package is installed (and a GPU runs it)."""
    import torch

    flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    return ["sdpa", "flash_attention_2"] if flash else ["sdpa"]


def job_overrides(model: str, dataset: str, extra: dict, method: str, keep: float, attn: str, args) -> dict:
    options = {"model": model, "dataset": dataset, "method": method, "keep": 1.0 if method == "vanilla" else keep,
               "limit": args.limit, "results_dir": str(args.results), "baseline": False, "report": False,
               "control": 0, "model.attn_implementation": attn, **extra}
    if args.dry:
        options["device"] = "cpu"
    else:
        options.update({"device": "cuda", "model.weights": "random", "model.dtype": "bfloat16"})
    return options


def row(record: dict, attn: str) -> dict:
    t, tokens, memory = record["timing"], record["tokens"], record["memory"]
    med = t.get("median", {})
    ms = {f"{k}_ms": (med.get(f"{k}_s") or 0.0) * 1e3
          for k in ("vision", "method", "prefill", "decode", "total", "ttft")}
    peak = memory.get("peak_gpu_bytes")
    return {"model": record["model"], "dataset": record["dataset"], "attn": attn, "method": record["method"],
            "keep": record["keep"], "tokens": f"{tokens.get('n_visual_out', 0):g}/{tokens.get('n_visual_in', 0):g}",
            **ms, "clock": t.get("clock"), "kv_mb": (memory.get("kv_bytes_prefill") or 0) / 2**20,
            "peak_gb": peak / 2**30 if peak else None, "n": record["n_samples"], "failed": record["n_failed"]}


def table(rows: list[dict], device: str, dry: bool, wall: float) -> str:
    head = ["model", "dataset", "attn", "method", "keep", "visual tokens", "vision ms", "method ms", "prefill ms",
            "decode ms", "total ms", "TTFT ms", "clock", "KV MiB", "peak GiB", "n", "failed"]
    lines = [f"# GPU check ({'DRY RUN on CPU, tiny checkpoints: not a GPU measurement' if dry else device})", "",
             f"`python scripts/gpu_check.py{' --dry' if dry else ''}`; {len(rows)} jobs in {wall:.0f} s; random "
             "weights (accuracy is noise, not shown); per-sample medians after one warm-up sample.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['dataset']} | {r['attn']} | {r['method']} | {r['keep']} | refused: "
                         f"{r['refused']} |" + " |" * (len(head) - 6))
            continue
        peak = "—" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        lines.append(f"| {r['model']} | {r['dataset']} | {r['attn']} | {r['method']} | {r['keep']} | {r['tokens']} | "
                     f"{r['vision_ms']:.1f} | {r['method_ms']:.1f} | {r['prefill_ms']:.1f} | {r['decode_ms']:.1f} | "
                     f"{r['total_ms']:.1f} | {r['ttft_ms']:.1f} | {r['clock']} | {r['kv_mb']:.1f} | {peak} | {r['n']} | "
                     f"{r['failed']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    from prunebench.errors import UserError
    from prunebench.jobs import compose_job
    from prunebench.models.loader import release_resident
    from prunebench.runner import run

    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; run with --dry for the CPU path", file=sys.stderr)
        return 2
    device = "CPU (dry run)" if args.dry else torch.cuda.get_device_name(0)
    start, rows = time.perf_counter(), []
    for model, dataset, extra in (DRY if args.dry else REAL):
        for attn in attentions():
            for method in METHODS:
                if time.perf_counter() - start > args.budget_s:
                    print(f"gpu_check: budget of {args.budget_s:.0f} s spent; table has {len(rows)} jobs",
                          file=sys.stderr)
                    break
                cfg = compose_job(job_overrides(model, dataset, extra, method, args.keep, attn, args))
                try:
                    record = json.loads(run(cfg, quiet=True, wait=True).read_text())
                except UserError as err:  # e.g. a tiny encoder cannot merge down to keep
                    rows.append({"model": model, "dataset": dataset, "attn": attn, "method": method,
                                 "keep": args.keep, "refused": str(err).splitlines()[0][:120]})
                    continue
                rows.append(row(record, attn))
                print(f"gpu_check: {model} {attn} {method}: {rows[-1]['total_ms']:.1f} ms/sample", file=sys.stderr)
        release_resident()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows, device, args.dry, time.perf_counter() - start))
    print(f"gpu_check: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
