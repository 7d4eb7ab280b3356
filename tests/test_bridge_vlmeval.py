"""The VLMEvalKit bridge end to end: run only where `vlmeval` imports (the optional backend).

A tiny LLaVA answers generated MME-, POPE- and MMBench-format TSVs registered under custom names;
the record's score must equal what VLMEvalKit's own `evaluate` gives on the prediction file,
mapped as the dataset YAML says. Also: import side effects undone, resume without re-answering.
"""

from __future__ import annotations

import json
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from prunebench.bridge import scores, tsv
from prunebench.bridge.isolate import vlmeval_missing_reason
from prunebench.cli import CONFIG_DIR
from prunebench.record import load_record

REASON = vlmeval_missing_reason()
pytestmark = [pytest.mark.vlmeval, pytest.mark.skipif(REASON is not None, reason=f"{REASON}")]

MME_CATS = ["OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters",
            "scene", "code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation"]


def _images(n: int) -> list[str]:
    from prunebench.data.shapes import build_shapes

    return [tsv.encode_png(it.image) for it in build_shapes(n, image_size=48)]


def write_mme(root: Path, name: str, per_category: int = 1) -> None:
    """Every MME category, `per_category` images each, two questions per image (Yes and No), MME's columns."""
    cats = MME_CATS * per_category
    images, rows = _images(len(cats)), []
    for i, cat in enumerate(cats):
        for q, answer in enumerate(("Yes", "No")):
            rows.append({"index": 2 * i + q, "image": images[i] if q == 0 else str(2 * i),
                         "image_path": f"{cat}/{i}.jpg", "question": f"Is this picture {q}? Please answer yes or no.",
                         "answer": answer, "category": cat})
    tsv.write_tsv(root / f"{name}.tsv", list(rows[0]), rows)


def write_pope(root: Path, name: str) -> None:
    images = _images(9)
    rows = [{"index": i, "image": images[i], "question": f"Is there a shape number {i} in the image?",
             "answer": ("Yes", "No")[i % 2], "category": ("adversarial", "popular", "random")[i % 3]}
            for i in range(9)]
    tsv.write_tsv(root / f"{name}.tsv", list(rows[0]), rows)


def write_mmbench(root: Path, name: str) -> None:
    images = _images(6)
    rows = [{"index": i, "question": "Which colour is the background?", "hint": "", "A": "red", "B": "blue",
             "C": "green", "D": "white", "answer": "ABCD"[i % 4], "category": ("attribute", "count")[i % 2],
             "l2-category": "perception", "split": "dev", "image": images[i]} for i in range(6)]
    tsv.write_tsv(root / f"{name}.tsv", list(rows[0]), rows)


def config(tiny_path: Path, results: Path, dataset: dict[str, Any], **top: Any) -> dict[str, Any]:
    """The composed config as Hydra builds it (the backend's venv may lack Hydra)."""
    cfg = {k: v for k, v in yaml.safe_load((CONFIG_DIR / "config.yaml").read_text()).items()
           if k not in ("defaults", "hydra")}
    model = yaml.safe_load((CONFIG_DIR / "model" / "tiny_llava.yaml").read_text())
    method = yaml.safe_load((CONFIG_DIR / "method" / "fastv.yaml").read_text())
    cfg.update(model={**model, "path": str(tiny_path)}, method=method, dataset=dataset, results_dir=str(results),
               device="cpu", keep=0.5, baseline=False, report=False, **top)
    return cfg


def dataset_cfg(base: str, name: str, root: Path, **extra: Any) -> dict[str, Any]:
    d = yaml.safe_load((CONFIG_DIR / "dataset" / f"{base}.yaml").read_text())
    return {**d, "name": name, "base": base, "md5": None, "url": None, "data_dir": str(root), "max_new_tokens": 3,
            **extra}


def vlmeval_reference(record_path: Path, base: str, name: str, root: Path, tmp: Path) -> dict[str, float]:
    """VLMEvalKit's own evaluate on a copy of the run's prediction file (fresh intermediate files)."""
    from prunebench.bridge.isolate import contained, vlmeval_api
    from prunebench.bridge.run import _lmudata

    rec = load_record(record_path)
    work = record_path.parent / "vlmeval"
    pred = next(p for p in work.iterdir() if p.name == f"{rec.benchmark['model_name']}_{name}.xlsx")
    copy = tmp / "ref" / pred.name
    copy.parent.mkdir()
    shutil.copy(pred, copy)
    with contained(), _lmudata(root):
        table = vlmeval_api().build_dataset(name).evaluate(str(copy), model="exact_matching")
    return scores.flatten(table)


def _fixed_answer(monkeypatch, text: str) -> None:
    """Real pruned generation (timings, counts), then a fixed answer: the untrained tiny model's
    answers score 0 everywhere, which would not tell a wrong mapping from a right one."""
    from prunebench import generation

    real = generation.generate_timed

    def generate(*args, **kwargs):
        return {**real(*args, **kwargs), "text": text}

    monkeypatch.setattr(generation, "generate_timed", generate)


@pytest.mark.parametrize("answer", [None, "fixed"])
@pytest.mark.parametrize("base,writer,fixed", [("MME", write_mme, "Yes"), ("POPE", write_pope, "Yes"),
                                               ("MMBench_DEV_EN", write_mmbench, "A")])
def test_record_score_equals_vlmevalkit_evaluate(tiny_path, tmp_path, monkeypatch, base, writer, fixed,
                                                 answer) -> None:
    from prunebench.bridge.run import run_vlmeval

    root, name = tmp_path / "LMUData", f"{base}_pbtiny"
    root.mkdir()
    writer(root, name)
    if answer == "fixed":
        _fixed_answer(monkeypatch, fixed)
    path = run_vlmeval(config(tiny_path, tmp_path / "results", dataset_cfg(base, name, root)), quiet=True)
    rec = load_record(path)
    flat = vlmeval_reference(path, base, name, root, tmp_path)
    assert rec.status == "complete" and rec.metrics == pytest.approx(flat)
    n = rec.n_samples
    spec = yaml.safe_load((CONFIG_DIR / "dataset" / f"{base}.yaml").read_text())["score"]
    assert rec.score == pytest.approx(scores.main_score(flat, spec, n))
    if base == "MME":  # the paper's normalisation, from VLMEvalKit's own table
        assert rec.score == pytest.approx((flat["perception"] + flat["reasoning"]) / 28)
    if base == "POPE":
        assert rec.score == flat["Overall|Overall"]
    if answer == "fixed":  # always "Yes" / "A": known, non-zero scores
        want = {"MME": 25.0, "POPE": 100 * 2 * (5 / 9) / (1 + 5 / 9), "MMBench_DEV_EN": 100 * 2 / 6}[base]
        assert rec.score == pytest.approx(want)
    rows = [json.loads(x) for x in (path.parent / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == n and len({str(r["index"]) for r in rows}) == n
    assert all(r["n_visual_out"] == 18 and r["timing"]["prefill_s"] > 0 for r in rows)  # keep 0.5 of 36
    assert rec.tokens["n_visual_out"] == 18 and rec.timing["n_timed"] == n
    assert rec.benchmark["scored_as"] == base and "k0.500" in rec.benchmark["model_name"]


def test_subset_routes_to_the_same_scorer(tiny_path, tmp_path) -> None:
    from prunebench.bridge.run import run_vlmeval

    root = tmp_path / "LMUData"
    root.mkdir()
    write_mme(root, "MME", per_category=2)
    d = {**dataset_cfg("MME", "MME", root), "limit": 28}
    path = run_vlmeval(config(tiny_path, tmp_path / "results", d), quiet=True)
    rec = load_record(path)
    assert rec.dataset == "MME_pbsub28s0" and rec.n_samples == 28 and rec.limit == 28
    assert {"perception", "reasoning"} <= set(rec.metrics)  # MME's rating ran on the subset
    assert rec.score == pytest.approx((rec.metrics["perception"] + rec.metrics["reasoning"]) / 28)


def test_resume_answers_every_index_once(tiny_path, tmp_path, monkeypatch) -> None:
    from prunebench.bridge import model as bridge_model
    from prunebench.bridge.run import run_vlmeval

    root = tmp_path / "LMUData"
    root.mkdir()
    write_pope(root, "POPE_pbtiny")
    cfg = config(tiny_path, tmp_path / "results", dataset_cfg("POPE", "POPE_pbtiny", root))
    real, calls = bridge_model.Session.answer, []

    def dying(self, message):
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed mid-dataset, between VLMEvalKit's pickle dumps
        calls.append(self.index)
        return real(self, message)

    monkeypatch.setattr(bridge_model.Session, "answer", dying)
    with pytest.raises(KeyboardInterrupt):
        run_vlmeval(cfg, quiet=True)
    monkeypatch.setattr(bridge_model.Session, "answer", real)
    generated = []
    original = bridge_model.Session.answer

    def counting(self, message):
        before, index = self.generated, self.index  # answer() consumes the tracked index
        out = original(self, message)
        if self.generated > before:
            generated.append(index)
        return out

    monkeypatch.setattr(bridge_model.Session, "answer", counting)
    path = run_vlmeval(cfg, quiet=True)
    rows = [json.loads(x) for x in (path.parent / "predictions.jsonl").read_text().splitlines()]
    assert sorted(int(r["index"]) for r in rows) == list(range(9))
    assert sorted(int(i) for i in generated) == list(range(5, 9))  # only what the killed run had not answered
    assert load_record(path).status == "complete"


def test_import_side_effects_are_undone() -> None:
    import logging
    import random

    from prunebench.bridge import isolate

    isolate._API = None  # import again under the guard
    grad, rng, ctx = torch.is_grad_enabled(), torch.get_rng_state(), ssl._create_default_https_context
    handlers, py = list(logging.getLogger().handlers), random.getstate()
    isolate.vlmeval_api()
    import vlmeval.vlm  # noqa: F401  (already imported: its side effects ran under the guard)

    assert torch.is_grad_enabled() == grad and torch.equal(torch.get_rng_state(), rng)
    assert ssl._create_default_https_context is ctx and logging.getLogger().handlers == handlers
    assert random.getstate() == py


def test_shapes_suite_runs_through_the_bridge(tiny_path, tmp_path) -> None:
    from prunebench.bridge.run import run_vlmeval

    d = yaml.safe_load((CONFIG_DIR / "dataset" / "shapes_vlmeval.yaml").read_text())
    d.update(data_dir=str(tmp_path / "LMUData"), export_args={"n": 5, "seed": 0, "image_size": 48})
    rec = load_record(run_vlmeval(config(tiny_path, tmp_path / "results", d), quiet=True))
    assert rec.n_samples == 5 and 0 <= rec.score <= 100 and rec.benchmark["scored_as"] is None


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_same_predictions(tiny_path, tmp_path) -> None:
    import os
    import subprocess
    import sys

    root = tmp_path / "LMUData"
    root.mkdir()
    write_pope(root, "POPE_pbtiny")
    args = ["dataset=POPE", "dataset.name=POPE_pbtiny", "+dataset.base=POPE", "dataset.md5=null",
            f"dataset.data_dir={root}", "dataset.max_new_tokens=3", "model=tiny_llava", f"model.path={tiny_path}", "method=fastv",
            "keep=0.5", "device=cpu", "baseline=false", "report=false"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "prunebench"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "prunebench", *args, f"results_dir={tmp_path / 'one'}"], check=True,
                   env=env, capture_output=True)
    subprocess.run([*torchrun, *args, f"results_dir={tmp_path / 'two'}"], check=True, env=env, capture_output=True)

    def answers(results: Path) -> dict[str, str]:
        folder = next(results.glob("*/POPE_pbtiny/fastv/*"))
        rows = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
        return {str(r["index"]): r["prediction"] for r in rows}

    one, two = answers(tmp_path / "one"), answers(tmp_path / "two")
    assert len(one) == 9 and one == two
    rec = load_record(next((tmp_path / "two").glob("*/POPE_pbtiny/fastv/*/record.json")))
    assert rec.benchmark["world_size"] == 2 and set(rec.timing["per_rank"]) == {"0", "1"}
    assert rec.timing["n_timed"] == 9 and rec.n_samples == 9


# ------------------------------------------------ VLMEvalKit's own files: decoded images, downloads, scorer


def _built(tmp_path: Path, d: dict[str, Any]) -> Any:
    from prunebench.bridge.isolate import contained, vlmeval_api
    from prunebench.bridge.run import _lmudata, build_vlmeval_dataset, prepare_data

    data = prepare_data({"dataset": d, "limit": None})
    with contained(), _lmudata(data.root):
        return build_vlmeval_dataset(vlmeval_api(), data, tmp_path / "work")


def _write_mme_images(root: Path, name: str, offset: int) -> None:
    """write_mme with other pictures (shapes drawn from another seed range)."""
    from prunebench.data.shapes import build_shapes

    write_mme(root, name)
    columns, rows = tsv.read_tsv(root / f"{name}.tsv")
    images = [tsv.encode_png(it.image) for it in build_shapes(len(rows) + offset, seed=7, image_size=48)][offset:]
    for i, row in enumerate(rows):
        if len(row["image"]) > tsv.IMAGE_REF_MAX:
            row["image"] = images[i]
    tsv.write_tsv(root / f"{name}.tsv", columns, rows)


def test_a_replaced_tsv_is_decoded_afresh_by_vlmevalkit(tmp_path) -> None:
    """VLMEvalKit's real dump_image: the second TSV's images, not the first's, reach the prompt."""
    from vlmeval.smp import decode_base64_to_image_file

    root = tmp_path / "LMUData"
    root.mkdir()
    write_mme(root, "MME_pbimg")
    d = dataset_cfg("MME", "MME_pbimg", root)
    first = _built(tmp_path, d)
    old = {str(r["index"]): Path(first.dump_image(r)[0]).read_bytes() for r in first.data.to_dict("records")}
    _write_mme_images(root, "MME_pbimg", offset=3)
    second = _built(tmp_path, d)
    rows = second.data.to_dict("records")
    new = {str(r["index"]): Path(second.dump_image(r)[0]).read_bytes() for r in rows}
    for r in rows:  # each file is what VLMEvalKit decodes from this TSV's base64 (JPEG, so compared as files)
        fresh = tmp_path / "fresh" / f"{r['index']}.jpg"
        fresh.parent.mkdir(exist_ok=True)
        decode_base64_to_image_file(r["image"], str(fresh))
        assert new[str(r["index"])] == fresh.read_bytes()
    assert sum(new[k] != old[k] for k in new) == len(new)
    assert Path(second.img_root).parent == root / "images" and second.img_root != first.img_root


def test_md5_null_on_mme_reads_the_users_file_and_never_downloads(tmp_path, monkeypatch) -> None:
    """dataset=MME dataset.md5=null: VLMEvalKit's own MD5 check used to download over MME.tsv."""
    import vlmeval.dataset.image_base as image_base

    root = tmp_path / "LMUData"
    root.mkdir()
    write_mme(root, "MME")
    before = (root / "MME.tsv").read_bytes()
    calls = []
    monkeypatch.setattr(image_base, "download_file", lambda url, filename=None: calls.append((url, filename)))
    d = yaml.safe_load((CONFIG_DIR / "dataset" / "MME.yaml").read_text())
    d.update(md5=None, data_dir=str(root))
    dataset = _built(tmp_path, d)
    assert calls == [] and (root / "MME.tsv").read_bytes() == before and len(dataset) == 28


def test_custom_name_without_base_stops_before_the_model_loads(tiny_path, tmp_path, monkeypatch) -> None:
    from prunebench.bridge.run import run_vlmeval
    from prunebench.errors import UserError
    from prunebench.models import loader

    root = tmp_path / "LMUData"
    root.mkdir()
    write_mme(root, "MyMME_local")
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    d = yaml.safe_load((CONFIG_DIR / "dataset" / "MME.yaml").read_text())
    d.update(name="MyMME_local", md5=None, data_dir=str(root))  # dataset=MME dataset.name=MyMME_local
    with pytest.raises(UserError, match=r"MyMME_local is not a dataset VLMEvalKit knows.*\+dataset\.base=MME"):
        run_vlmeval(config(tiny_path, tmp_path / "results", d), quiet=True)
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("record.json"))


def test_vlmeval_own_run_py_runs_the_pruned_model(tiny_path, tmp_path):
    """Issue 15: VLMEvalKit's own run.py (`python -m prunebench.bridge.vlmeval_run --config ...`) with the pruned
    model as a `PrunebenchVLM` config entry answers as the bridge does: same predictions, and run.py scores them."""
    import os
    import subprocess
    import sys

    from prunebench.bridge.run import run_vlmeval

    root = tmp_path / "LMUData"
    root.mkdir()
    write_pope(root, "POPE_pbtiny")
    bridge = run_vlmeval(config(tiny_path, tmp_path / "results", dataset_cfg("POPE", "POPE_pbtiny", root)), quiet=True)
    expected = [json.loads(x)["prediction"] for x in (bridge.parent / "predictions.jsonl").read_text().splitlines()]
    sink = tmp_path / "pb.jsonl"
    spec = {"model": {"pb-fastv": {"class": "PrunebenchVLM", "model": "tiny_llava", "model.path": str(tiny_path),
                                   "method": "fastv", "keep": 0.5, "device": "cpu", "predictions": str(sink),
                                   "max_new_tokens": 3}},  # dataset_cfg's
            "data": {"POPE_pbtiny": {"class": "ImageYORNDataset", "dataset": "POPE_pbtiny"}}}
    (tmp_path / "pb.json").write_text(json.dumps(spec))
    env = {**os.environ, "LMUData": str(root)}
    done = subprocess.run([sys.executable, "-m", "prunebench.bridge.vlmeval_run", "--config", str(tmp_path / "pb.json"),
                           "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, env=env,
                          cwd=str(Path(__file__).resolve().parent.parent), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in sink.read_text().splitlines()]
    assert [r["prediction"] for r in rows] == expected and all(r["n_visual_out"] == 18 for r in rows)
    assert list((tmp_path / "work").rglob("*POPE_pbtiny*score*")), sorted(p.name for p in (tmp_path / "work").rglob("*"))
