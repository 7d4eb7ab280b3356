"""Benchmark (not a test): vision / method / LLM-prefill time vs keep on a mid-size random LLaVA.

    python scripts/bench_prefill.py                       # random_pre, keep 1.0 / 0.333 / 0.111, CPU, 1 thread
    python scripts/bench_prefill.py --method fastv --device cuda --runs 20
    python scripts/bench_prefill.py --method fastv dart tome evoprune --keeps 1.0 0.111   # several methods

Architecture: CLIP 12x768 (336 px, patch 14 -> 576 visual tokens), Llama 8x1024, random weights
(shapes are what matter for time). Prints per-keep medians over --runs timed generations (after
--warmup untimed rounds) of the vision, method and LLM-prefill spans, and prefill(keep) / prefill(1.0); the jobs
run interleaved, one generation each per round, so a slow stretch of a shared machine falls on all of them.
On CPU use one thread: shared cores make absolute times noisy; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from prunebench.families.llava import llava_seams
from prunebench.fixtures.tiny import build_processor
from prunebench.measure import instrument
from prunebench.methods import resolve_method
from prunebench.stages import install
from prunebench.timing import Timer


def mid_size_llava(vocab: int, image_token_id: int, pad_id: int) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=336, patch_size=14, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=vocab, max_position_embeddings=2048, pad_token_id=pad_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", nargs="+", default=["random_pre"], help="one or more registered methods")
    ap.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.333, 0.111])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    processor = build_processor(336, 14)
    tok = processor.tokenizer
    model = mid_size_llava(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id).to(device)
    seams = llava_seams(model)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (336, 336), (200, 30, 30)), text=prompt, return_tensors="pt").to(device)
    print(f"device={device} threads={torch.get_num_threads()} prompt_len={inputs['input_ids'].shape[1]} "
          f"visual_tokens={seams.n_vision_patches} methods={' '.join(args.method)} runs={args.runs} (medians)",
          file=sys.stderr)

    timer, rows = Timer(device), []
    jobs = [("vanilla", 1.0)] if 1.0 in args.keeps else []
    jobs += [(m, k) for m in args.method for k in args.keeps if k != 1.0]
    spans: dict[tuple[str, float], list[tuple[float, float, float]]] = {job: [] for job in jobs}
    counts = {}
    with instrument(model, seams, timer):
        for i in range(args.warmup + args.runs):  # interleaved: every job once per round, so drift hits all alike
            for name, keep in jobs:
                with install(seams, resolve_method(name), keep, seed=0, timer=timer) as inst:
                    timer.reset()
                    with torch.inference_mode():
                        model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
                    counts[name, keep] = inst.counts
                if i >= args.warmup:
                    s = timer.seconds()
                    spans[name, keep].append((s.get("vision", 0.0), s.get("method", 0.0), timer.spans("forward")[0]))
    for (name, keep), got in spans.items():
        c = counts[name, keep]
        rows.append((name, keep, c.n_visual_out, c.layer_avg, *(statistics.median(x) for x in zip(*got, strict=True))))

    base = next(((r[4], r[6]) for r in rows if r[0] == "vanilla"), None)
    print(f"{'method':<14} {'keep':>6} {'tokens':>6} {'layer avg':>9} {'vision ms':>10} {'method ms':>10} "
          f"{'prefill ms':>11} {'prefill/vanilla':>16} {'vision+prefill/vanilla':>23}")
    for name, keep, n, avg, vision, method_s, prefill in rows:
        ratio = f"{prefill / base[1]:.3f}" if base else "-"
        both = f"{(vision + prefill) / (base[0] + base[1]):.3f}" if base else "-"
        print(f"{name:<14} {keep:6.3f} {n:6d} {avg:9.1f} {vision * 1e3:10.1f} {method_s * 1e3:10.2f} "
              f"{prefill * 1e3:11.1f} {ratio:>16} {both:>23}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
