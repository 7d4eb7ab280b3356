"""A built-in suite (probe, shapes) as an lmms-eval task over local files, so lmms-eval runs it offline.

    python -m prunebench.lmms.task OUT_DIR [--dataset probe] [--n 600]   # writes OUT_DIR/<task>.yaml + data
    python -m lmms_eval eval --model prunebench --tasks prunebench_probe --include_path OUT_DIR ...

The task reads `OUT_DIR/<task>.jsonl` (one row per item: image file, question, answer, category, in the suite's
order, so lmms-eval's doc_id is the item's index) with the `datasets` json loader; its prompt is the item's
question; its metric `accuracy` is prunebench's own exact match (`data.shapes.score_answer`), aggregated as
prunebench's record scores the suite (overall accuracy, 0-100). Functions below are what the task's YAML names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from PIL import Image

TASK_YAML = """\
# written by `python -m prunebench.lmms.task`: the prunebench {dataset} suite ({n} items), local files
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function {task}_utils.doc_to_visual
doc_to_text: !function {task}_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
  num_beams: 1
process_results: !function {task}_utils.process_results
metric_list:
  - metric: accuracy
    aggregation: !function {task}_utils.aggregate
    higher_is_better: true
metadata:
  version: 0.0
"""

UTILS = """\
# written by `python -m prunebench.lmms.task`: the task's functions are prunebench's own
from prunebench.lmms.task import aggregate, doc_to_text, doc_to_visual, process_results  # noqa: F401
"""


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: Any = None) -> str:
    return str(doc["question"])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    from prunebench.data.shapes import score_answer

    return {"accuracy": {"correct": bool(score_answer(results[0], str(doc["answer"]))),
                         "category": doc["category"]}}


def aggregate(results: list[dict[str, Any]]) -> float:
    """Overall accuracy, 0-100, as prunebench's record states the suite's score."""
    return 100.0 * sum(r["correct"] for r in results) / len(results) if results else float("nan")


def export(out: Path, dataset: str = "probe", n: int | None = None, **overrides: Any) -> Path:
    """Write the built-in suite `configs/dataset/<dataset>.yaml` (`n` items, other settings overridden) as
    lmms-eval task `prunebench_<dataset>` under `out`; returns the task YAML's path."""
    from hydra import compose, initialize_config_dir

    from prunebench.checks import CONFIG_DIR

    extra = [f"dataset.{k}={v}" for k, v in overrides.items()] + ([f"dataset.n={n}"] if n is not None else [])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={dataset}", *extra])
    return export_suite(out, cfg.dataset, f"prunebench_{dataset}")


def export_suite(out: Path, suite_cfg: Any, task: str) -> Path:
    """Write a built-in suite given by its dataset config (`kind`, `n`, ...) as lmms-eval task `task`."""
    from prunebench.data.datasets import build_dataset

    suite = build_dataset(suite_cfg)
    out = out.resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / f"{task}.jsonl").open("w") as f:
        for item in suite.items():
            if item.frames:
                raise ValueError(f"{task}: a video suite is not exported")
            path = out / "images" / f"{task}_{item.index:05d}.png"
            item.image.save(path)  # PNG: the pixels the built-in run sees
            f.write(json.dumps({"index": item.index, "image": str(path), "question": item.question,
                                "answer": item.answer, "category": item.category}) + "\n")
    yaml_path = out / f"{task}.yaml"
    yaml_path.write_text(TASK_YAML.format(task=task, dataset=suite_cfg["kind"], n=len(suite.items()),
                                          data=out / f"{task}.jsonl", max_new_tokens=suite.max_new_tokens))
    (out / f"{task}_utils.py").write_text(UTILS)
    return yaml_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dataset", default="probe", choices=["probe", "shapes"])
    ap.add_argument("--n", type=int, default=None, help="items (default: the dataset config's n)")
    args = ap.parse_args(argv)
    print(export(args.out, args.dataset, args.n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
