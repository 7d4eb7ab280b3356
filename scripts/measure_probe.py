"""Pruning on the trained probe: vanilla and random_pre at keep 0.333 / 0.222 / 0.111, per family.

    python scripts/measure_probe.py [--per-family 500] [--model probe_llava] [--card checkpoints/probe_llava/README.md]

Runs the normal job runner (`python -m prunebench`, model=<--model> dataset=probe) so the numbers
are the records' own, then writes the per-family table between the card's `pruning` markers and
checks what issue 6 asks: detail-dependent families degrade monotonically as keep falls, and the
coarse control stays within 5 points of vanilla.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prunebench.data.probe import COARSE  # noqa: E402
from prunebench.report import collect  # noqa: E402

START, END = "<!-- pruning:start -->", "<!-- pruning:end -->"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-family", type=int, default=500)
    p.add_argument("--keeps", default="0.333,0.222,0.111")
    p.add_argument("--results", type=Path, default=None,
                   help="default results/probe-measure/<weights hash>: new weights never reuse old records")
    p.add_argument("--card", type=Path, default=None, help="default: README.md in the model's checkpoint directory")
    p.add_argument("--model", default="probe_llava", help="a trained probe in configs/model/ (probe_llava, probe_qwen25vl, probe_internvl3)")
    args = p.parse_args(argv)
    config = ROOT / "configs" / "model" / f"{args.model}.yaml"
    if not config.is_file():
        probes = sorted(f.stem for f in config.parent.glob("probe_*.yaml"))
        p.error(f"--model {args.model}: no configs/model/{args.model}.yaml; trained probes: {', '.join(probes)}")
    if args.card is None:
        cfg = yaml.safe_load(config.read_text())
        args.card = ROOT / cfg["path"] / "README.md"
    return args


def families() -> list[str]:
    from prunebench.data.probe import check_families

    cfg = yaml.safe_load((ROOT / "configs" / "dataset" / "probe.yaml").read_text())
    return list(check_families(cfg.get("families")))


def run_jobs(args: argparse.Namespace, n: int) -> None:
    cmd = [sys.executable, "-m", "prunebench", "-m", f"model={args.model}", "dataset=probe", "method=random_pre",
           f"keep={args.keeps}", f"dataset.n={n}", f"results_dir={args.results}", "report=false"]
    print("[measure_probe] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def table(args: argparse.Namespace, fams: list[str], n: int) -> tuple[str, list[str]]:
    records = [r for r in collect(args.results) if r.status == "complete" and r.dataset == "probe"
               and r.n_samples == n and r.method in ("vanilla", "random_pre")]
    vanilla = next(r for r in records if r.method == "vanilla")
    keeps = sorted({r.keep for r in records if r.method == "random_pre"}, reverse=True)
    by_keep = {k: next(r for r in records if r.method == "random_pre" and r.keep == k) for k in keeps}
    floor = vanilla.floor.get("metrics", {})
    head = "| family | blind floor | vanilla | " + " | ".join(f"random_pre {k:g}" for k in keeps) + " | check |"
    lines = [head, "|---" * (4 + len(keeps)) + "|"]
    verdicts = []
    for f in fams:
        scores = [vanilla.metrics[f]] + [by_keep[k].metrics[f] for k in keeps]
        if f in COARSE:
            ok = all(abs(s - scores[0]) <= 5.0 for s in scores[1:])
            check = "coarse: within 5 points" if ok else "coarse: NOT within 5 points"
        else:
            ok = all(a >= b for a, b in zip(scores, scores[1:], strict=False))
            check = "monotone" if ok else "NOT monotone"
        verdicts.append(f"{f}: {check}")
        lines.append(f"| {f} | {floor.get(f, float('nan')):.1f} | "
                     + " | ".join(f"{s:.1f}" for s in scores) + f" | {check} |")
    return "\n".join(lines), verdicts


def write_card(card: Path, text: str) -> None:
    body = card.read_text(encoding="utf-8")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    card.write_text(head + START + "\n" + text + "\n" + END + tail, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.results is None:
        weights = args.card.parent / "model.safetensors"
        digest = hashlib.sha1(weights.read_bytes()).hexdigest()[:10]
        args.results = ROOT / "results" / "probe-measure" / digest
    fams = families()
    n = args.per_family * len(fams)
    run_jobs(args, n)
    rows, verdicts = table(args, fams, n)
    device = next(r.device for r in collect(args.results) if r.method == "vanilla")
    text = (f"## Pruning: random_pre per family ({args.per_family} questions per family, `dataset=probe "
            f"dataset.n={n}`, generated answers scored by exact match)\n\n"
            f"Measured with `python scripts/measure_probe.py"
            f"{'' if args.model == 'probe_llava' else ' --model ' + args.model} --per-family {args.per_family}` on "
            f"{device.get('name', '?')} ({device.get('torch_threads', '?')} thread); random_pre seed 0.\n\n"
            f"{rows}\n")
    write_card(args.card, text)
    print(text)
    print(json.dumps(verdicts, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
