"""Calibrate VTW's withdrawal layer K on a model (the official `--findk`; prunebench/calibrate.py).

    python scripts/vtw_findk.py --model llava15 --dataset shapes --samples 20 --eta 0.003
    python -m prunebench model=llava15 method=vtw method.params.layer=K ...   # then run with it

Prints the mean KL divergence between the full model's last-token distribution and the one with
every visual token withdrawn at layer k, for k = 5..L-1 (1..L-1 on models shallower than that), and
the first k whose mean KL <= eta (L, nothing withdrawn, when none qualifies).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from prunebench.calibrate import DIRECTIONS, candidate_layers, choose_layer, kl_curve
from prunebench.data.datasets import build_dataset
from prunebench.models.loader import load_model, resolve_device

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _config(group: str, name: str) -> dict:
    path = CONFIGS / group / f"{name}.yaml"
    if not path.exists():
        choices = ", ".join(sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")))
        raise SystemExit(f"unknown {group} '{name}'; valid choices: {choices}")
    return yaml.safe_load(path.read_text())


def _prompts(loaded, items):
    """The runner's prompt format (one image, the question) for each sample."""
    processor = loaded.processor
    for item in items:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}]
        text = processor.apply_chat_template(conv, add_generation_prompt=True)
        inputs = processor(text=text, images=item.image, return_tensors="pt").to(loaded.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        yield inputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny_llava", help="a configs/model/<name>.yaml")
    ap.add_argument("--dataset", default="shapes", help="a configs/dataset/<name>.yaml (image datasets)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--eta", type=float, default=0.003, help="0.003 (7B), 0.0005 (13B), 0.0001 (LLaVA-1.6-7B)")
    ap.add_argument("--first", type=int, default=5, help="first candidate layer (official: 5)")
    ap.add_argument("--direction", choices=DIRECTIONS, default="withdrawn",
                    help="withdrawn: KL(withdrawn || full), as the official code; full: KL(full || withdrawn)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(_config("model", args.model), resolve_device(args.device))
    items = build_dataset(_config("dataset", args.dataset)).items()[: args.samples]
    n_layers = len(loaded.seams.decoder_layers)
    layers = candidate_layers(n_layers, args.first)
    curve = kl_curve(loaded.seams, loaded.model, _prompts(loaded, items), layers, args.direction)
    for k, kl in curve.items():
        print(f"k={k:3d}  mean KL={kl:.6g}")
    k = choose_layer(curve, args.eta, n_layers)
    print(f"K={k} (first k with mean KL <= {args.eta}; L={n_layers}); run with method=vtw method.params.layer={k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
