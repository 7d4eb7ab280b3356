"""The probe suite (issue 6): deterministic, answers right for the pictures drawn, TSV round-trip."""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prunebench.bridge import tsv
from prunebench.data import probe
from prunebench.data.datasets import build_dataset
from prunebench.errors import UserError

N = 120  # 20 per family


def _same(a, b) -> bool:
    return (a.index, a.question, a.answer, a.category) == (b.index, b.question, b.answer, b.category) \
        and a.image.tobytes() == b.image.tobytes()


def test_deterministic_and_prefix() -> None:
    first, again, longer = probe.build_probe(N), probe.build_probe(N), probe.build_probe(N + 30)
    assert all(_same(a, b) for a, b in zip(first, again, strict=True))
    assert all(_same(a, b) for a, b in zip(first, longer, strict=False))
    other = probe.build_probe(N, seed=1)
    assert sum(a.image.tobytes() != b.image.tobytes() for a, b in zip(first, other, strict=True)) > N // 2


def test_splits_differ_and_families_balanced() -> None:
    test = [probe.make_scene_qa(i, split="test")[1] for i in range(60)]
    train = [probe.make_scene_qa(i, split="train")[1] for i in range(60)]
    assert sum(a != b for a, b in zip(test, train, strict=True)) > 50
    counts = Counter(it.category for it in probe.build_probe(N))
    assert counts == {f: N // len(probe.FAMILIES) for f in probe.FAMILIES}


def test_answers_are_balanced_within_families() -> None:
    by = {f: Counter() for f in probe.FAMILIES}
    for it in probe.build_probe(6 * 40):
        by[it.category][it.answer] += 1
    assert by["existence"] == {"yes": 20, "no": 20}
    assert by["attribute"] == {L: 10 for L in "ABCD"}
    assert by["count"] == {str(k): 10 for k in range(1, 5)}
    assert by["reading"] == {str(d): 4 for d in range(10)}
    assert min(by["spatial"].values()) >= 10


# ------------------------------------------------------------------ answers checked on the pixels


def _color_of(rgb: tuple[int, int, int]) -> str:
    return next(name for name, value in probe.COLORS.items() if value == rgb)


def _components(image: Image.Image) -> list[list[tuple[int, int]]]:
    """4-connected regions of non-background pixels (brute force flood fill)."""
    w, h = image.size
    px = image.load()
    bg = px[0, 0] if all(px[0, 0] == px[x, y] for x, y in [(0, h - 1), (w - 1, 0), (w - 1, h - 1)]) else None
    background = bg if bg is not None else Counter(image.getdata()).most_common(1)[0][0]
    seen, regions = set(), []
    for y in range(h):
        for x in range(w):
            if (x, y) in seen or px[x, y] == background:
                continue
            queue, region = deque([(x, y)]), []
            seen.add((x, y))
            while queue:
                cx, cy = queue.popleft()
                region.append((cx, cy))
                for nx, ny in ((cx + 1, cy), (cx - 1, cy), (cx, cy + 1), (cx, cy - 1)):
                    if 0 <= nx < w and 0 <= ny < h and (nx, ny) not in seen and px[nx, ny] != background:
                        seen.add((nx, ny))
                        queue.append((nx, ny))
            regions.append(region)
    return regions


def _background(image: Image.Image) -> str:
    return _color_of(Counter(image.getdata()).most_common(1)[0][0])


def _objects(image: Image.Image) -> list[dict]:
    """Objects seen on the pixels: colour, cell, and a shape guess from fill ratio and profile."""
    cell = image.size[0] / probe.GRID
    out = []
    for region in _components(image):
        xs, ys = [p[0] for p in region], [p[1] for p in region]
        w, h = max(xs) - min(xs) + 1, max(ys) - min(ys) + 1
        fill = len(region) / (w * h)
        top_row = sum(1 for p in region if p[1] == min(ys))
        kind = "square" if fill > 0.97 else ("triangle" if top_row <= 3 else "circle")
        color = _color_of(image.getpixel(region[0]))
        out.append({"kind": kind, "color": color, "col": int((min(xs) + max(xs)) / 2 // cell),
                    "row": int((min(ys) + max(ys)) / 2 // cell), "fill": fill})
    return out


def _read_digit(image: Image.Image) -> str | None:
    """Decode the seven-segment digit from the pixels: the one tall component (shapes have square
    bounding boxes), then which of its cell's seven segment centres are lit."""
    cell = image.size[0] / probe.GRID
    bg = probe.COLORS[_background(image)]
    tall = [r for r in _components(image)
            if (max(p[1] for p in r) - min(p[1] for p in r)) > 1.2 * (max(p[0] for p in r) - min(p[0] for p in r))]
    if len(tall) != 1:
        return None
    xs, ys = [p[0] for p in tall[0]], [p[1] for p in tall[0]]
    x0, y0 = (min(xs) + max(xs)) / 2 // cell * cell, (min(ys) + max(ys)) / 2 // cell * cell
    t = 0.15 * cell / 2
    left, right, top, bottom = x0 + 0.22 * cell + t, x0 + 0.78 * cell - t, y0 + 0.08 * cell + t, y0 + 0.92 * cell - t
    cx, mid = x0 + cell / 2, y0 + cell / 2
    centres = {"a": (cx, top), "g": (cx, mid), "d": (cx, bottom), "f": (left, (top + mid) / 2),
               "b": (right, (top + mid) / 2), "e": (left, (mid + bottom) / 2), "c": (right, (mid + bottom) / 2)}
    lit = {s for s, (x, y) in centres.items() if image.getpixel((int(x), int(y))) != bg}
    return next((d for d, segs in probe.SEGMENTS.items() if set(segs) == lit), None)


@pytest.mark.parametrize("index", range(N))
def test_answer_matches_the_picture(index: int) -> None:
    it = probe.make_item(index)
    objs = _objects(it.image) if it.category != "reading" else []
    if it.category == "background":
        assert it.answer == _background(it.image)
    elif it.category == "count":
        assert it.answer == str(len(objs))
    elif it.category == "existence":
        color, kind = re.search(r"Is there a (\w+) (\w+) in", it.question).groups()
        assert it.answer == ("yes" if any(o["color"] == color and o["kind"] == kind for o in objs) else "no")
    elif it.category == "attribute":
        kind = re.search(r"What color is the (\w+)\?", it.question).group(1)
        (target,) = [o for o in objs if o["kind"] == kind]
        assert probe.mcq_options(it.question)[it.answer] == target["color"]
    elif it.category == "spatial":
        a, b = re.search(r"Is the (\w+) to the left or to the right of the (\w+)\?", it.question).groups()
        (oa,), (ob,) = ([o for o in objs if o["kind"] == k] for k in (a, b))
        assert it.answer == ("left" if oa["col"] < ob["col"] else "right")
    else:
        assert it.answer == _read_digit(it.image)


def test_shape_guesser_is_not_trivially_right() -> None:
    """The pixel checks above can fail: a wrong answer is caught."""
    it = next(i for i in probe.build_probe(N) if i.category == "count")
    assert str(len(_objects(it.image)) + 1) != it.answer


# -------------------------------------------------------------------------- labels, dataset, export


def test_patch_labels_follow_the_cells() -> None:
    family, scene, _, _ = probe.make_scene_qa(5)  # a reading item: a digit somewhere
    assert family == "reading"
    labels = probe.patch_labels(scene, 12)
    digit = scene.objects[0]
    inside = [i for i in range(144) if (i // 12) // 4 == digit.row and (i % 12) // 4 == digit.col]
    assert len(inside) == 16
    assert all(labels["kind"][i] == probe.KINDS.index("digit") for i in inside)
    assert all(labels["digit"][i] == int(digit.digit) for i in inside)
    assert sum(k > 0 for k in labels["kind"]) == 16 * len(scene.objects)
    assert set(labels["background"]) == {list(probe.COLORS).index(scene.background)}


def test_dataset_kind_scores_per_family() -> None:
    ds = build_dataset({"kind": "probe", "name": "probe", "n": 12, "families": ["count", "reading"]})
    items = ds.items()
    assert [it.category for it in items] == ["count", "reading"] * 6
    rows = [{"category": it.category, "correct": ds.is_correct(f"{it.answer}." if i % 2 else "nonsense", it)}
            for i, it in enumerate(items)]
    scored = ds.score(rows)
    assert scored.metrics == {"count": 0.0, "reading": 100.0}
    assert ds.is_correct("B", probe.make_item(8)) == (probe.make_item(8).answer == "B")


@pytest.mark.parametrize("families", [["nope"], []])
def test_bad_families_are_refused(families: list[str]) -> None:
    with pytest.raises(UserError, match="subset of: background, existence"):
        build_dataset({"kind": "probe", "name": "probe", "families": families})


def test_tsv_export_round_trips(tmp_path) -> None:
    path = tsv.export_probe(tmp_path, "prunebench_probe", n=24)
    columns, rows = tsv.read_tsv(path)
    assert columns == list(tsv.PROBE_COLUMNS)
    for row, it in zip(rows, probe.build_probe(24), strict=True):
        image = Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB")
        assert image.tobytes() == it.image.tobytes()
        assert (int(row["index"]), row["question"], row["answer"], row["category"]) == \
            (it.index, it.question, it.answer, it.category)
        options = {L: row[L] for L in "ABCD" if row[L]}
        assert options == probe.mcq_options(it.question)
        assert bool(options) == (it.category == "attribute")


# ------------------------------------------------------------------------ blind floor: runner, report


def test_blind_floor_is_attached_only_for_its_dataset(tmp_path) -> None:
    import json

    from prunebench.backends.builtin import blind_floor

    path = tmp_path / "blind_floor.json"
    path.write_text(json.dumps({"dataset": {"kind": "probe", "seed": 0, "image_size": 96},
                                "metrics": {"background": 10.0, "count": 30.0, "reading": 20.0}}))
    model = {"blind_floor": str(path), "path": str(tmp_path)}
    dcfg = {"kind": "probe", "name": "probe", "n": 4, "seed": 0, "image_size": 96, "families": ["count", "reading"]}
    floor = blind_floor(model, dcfg, build_dataset(dcfg))
    assert floor["metrics"] == {"count": 30.0, "reading": 20.0} and floor["score"] == 25.0
    assert blind_floor(model, {**dcfg, "seed": 1}, build_dataset({**dcfg, "seed": 1})) == {}
    assert blind_floor({}, dcfg, build_dataset(dcfg)) == {}
    assert blind_floor({**model, "path": str(tmp_path / "other")}, dcfg, build_dataset(dcfg)) == {}
    assert blind_floor({**model, "weights": "random"}, dcfg, build_dataset(dcfg)) == {}


def test_report_prints_the_floor_beside_vanilla(tmp_path) -> None:
    from prunebench import report
    from prunebench.record import RunRecord, save_record

    def rec(method: str, keep: float, score: float, metrics: dict, floor: dict) -> RunRecord:
        return RunRecord(model="probe_llava", dataset="probe", method=method, method_params={}, stage="none",
                         positions="keep", keep=keep, seed=0, limit=None, status="complete", n_samples=10,
                         score=score, metrics=metrics, floor=floor, finished_at="2026-01-01T00:00:00+00:00",
                         tokens={"n_visual_in": 144, "n_visual_out": round(144 * keep), "layer_avg": 144 * keep})

    floor = {"score": 30.0, "metrics": {"background": 15.0, "count": 45.0}, "source": "test"}
    save_record(tmp_path / "v", rec("vanilla", 1.0, 80.0, {"background": 100.0, "count": 60.0}, floor))
    save_record(tmp_path / "r", rec("random_pre", 0.111, 50.0, {"background": 100.0, "count": 0.0}, {}))
    text = report.render(report.collect(tmp_path))
    table = [line for line in text.splitlines() if line.startswith("|")]
    methods = [line.split("|")[2].strip() for line in table[2:5]]
    assert methods == ["vanilla (upper bound)", "blind floor (no visual tokens)", "random_pre"]
    assert "| 30.0 " in table[3]
    assert "| probe     | background | 100.0     | 15.0          | +85.0    | yes" in text
    assert "no (< 25 above blind)" in text  # count: 60 vs 45


# ------------------------------------------------------------------ the committed, trained checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["probe_llava", "probe_qwen25vl", "probe_internvl3"])
def probe_model(request):
    import yaml

    from prunebench.models.loader import load_model

    cfg = yaml.safe_load((ROOT / "configs" / "model" / f"{request.param}.yaml").read_text())
    if not (ROOT / cfg["path"] / "config.json").is_file():
        pytest.skip("the trained probe checkpoint is not in this checkout")
    import torch

    return cfg, load_model(cfg, torch.device("cpu"))


def test_trained_probe_loads_as_meaningful_and_beats_its_floor(probe_model) -> None:
    """Through the normal from_pretrained path; the coarse control is answered from the image, far
    above the shipped blind floor (a model that ignored the image could not)."""
    import json

    import torch

    cfg, loaded = probe_model
    assert loaded.accuracy_meaningful and loaded.weights == "pretrained"
    floor = json.loads((ROOT / cfg["blind_floor"]).read_text())
    ds = build_dataset({"kind": "probe", "name": "probe", "n": 16, "families": ["background"]})
    hits = 0
    for it in ds.items():
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.question}]}]
        prompt = loaded.processor.apply_chat_template(conv, add_generation_prompt=True)
        inputs = loaded.processor(text=prompt, images=it.image, return_tensors="pt")
        with torch.inference_mode():
            out = loaded.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        hits += ds.is_correct(loaded.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                                                                skip_special_tokens=True), it)
    assert 100.0 * hits / 16 >= floor["metrics"]["background"] + 25


# ------------------------------------------------------------------ training script: inputs and resume


@pytest.fixture(scope="module")
def trainer():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_probe.py"
    spec = importlib.util.spec_from_file_location("train_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_inputs_equal_the_inference_path(trainer) -> None:
    """What the model is trained on is what the runner feeds it: same ids, same pixels."""
    import torch

    args = trainer.parse(["--vision-layers", "2", "--text-layers", "2"])
    _, processor = trainer.build(args)
    prompts = trainer.Prompts(processor, 144)
    for it in probe.build_probe(6):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.question}]}]
        inputs = processor(text=processor.apply_chat_template(conv, add_generation_prompt=True), images=it.image,
                           return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == prompts.prompt(it.question)
        assert torch.equal(inputs["pixel_values"], trainer.pixels([it.image]))
        assert len(prompts.answer(it.answer)) == 2  # one answer token, then EOS
        assert prompts.image_id not in prompts.prompt(it.question, blind=True)


def test_training_state_resumes_exactly(trainer, tmp_path) -> None:
    import torch

    args = trainer.parse(["--vision-layers", "2", "--text-layers", "2", "--batch-a", "4", "--batch", "4",
                          "--steps-a", "2", "--steps-b", "1", "--steps-c", "1"])
    model, processor = trainer.build(args)
    heads = trainer.DenseHeads(args.vision_hidden)
    opt = torch.optim.AdamW([{"params": list(model.parameters()) + list(heads.parameters())}], lr=1e-3)
    tap, prompts = trainer.FeatureTap(model), trainer.Prompts(processor, 144)
    for step in range(3):
        trainer.train_step(step, args, model, heads, tap, prompts, opt, torch.device("cpu"), 12)
    trainer.save_state(tmp_path, 3, model, heads, opt, [{"step": 3, "seconds": 1.0}])
    model2, _ = trainer.build(args)
    heads2 = trainer.DenseHeads(args.vision_hidden)
    opt2 = torch.optim.AdamW([{"params": list(model2.parameters()) + list(heads2.parameters())}], lr=1e-3)
    step, log = trainer.load_state(tmp_path, model2, heads2, opt2)
    assert step == 3 and log[-1]["step"] == 3
    tap2 = trainer.FeatureTap(model2)
    trainer.train_step(3, args, model, heads, tap, prompts, opt, torch.device("cpu"), 12)
    trainer.train_step(3, args, model2, heads2, tap2, prompts, opt2, torch.device("cpu"), 12)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl", "internvl"])
@pytest.mark.parametrize("family", ["existence", "attribute", "spatial"])
def test_stage_e_supervision_names_what_the_question_names(trainer, family: str, arch: str) -> None:
    """Stage E's attention targets: the named words, the image tokens of the objects they name, the right option."""
    args = trainer.parse(["--vision-layers", "1", "--text-layers", "1", "--family", arch])
    _, processor = trainer.build(args)
    prompts, tok = trainer.Prompts(processor, 144), processor.tokenizer
    checked = 0
    for i in range(probe.FAMILIES.index(family), 6 * 40, 6):
        fam, scene, question, answer = probe.make_scene_qa(i, split="test")
        ids = prompts.prompt(question)
        at = ids.index(prompts.image_id)
        image = np.asarray(probe.render(scene))
        for offset, head, query, keys in trainer.supervision(prompts, fam, scene, question, answer, 12):
            assert 0 <= offset <= 2 and head in (0, 1) and keys
            if offset == 0:  # a named word -> every image token of the objects it names
                word = tok.decode([ids[query]]).strip()
                named = [o for o in scene.objects if word in (o.kind, o.color)]
                cells = {(r // 4, c // 4) for r, c in (divmod(k - at, 12) for k in keys)}
                assert all(at <= k < at + 144 for k in keys) and len(keys) == 16 * len(named)
                assert cells == {(o.row, o.col) for o in named}
                for o in named:  # the object's own colour is drawn at its cell's centre
                    assert tuple(image[o.row * 32 + 16, o.col * 32 + 16]) == probe.COLORS[o.color]
            elif offset == 1:  # the answer position -> a named word
                assert query is None and tok.decode([ids[k] for k in keys]).strip() in question
            else:  # the answer position -> the right option's line
                shape = re.search(r"color is the (\w+)\?", question).group(1)
                color = next(o.color for o in scene.objects if o.kind == shape)
                assert tok.decode([ids[k] for k in keys]).strip() == f"{answer}. {color}"
            checked += 1
    assert checked >= 40 * (3 if family == "attribute" else 4) - 40  # every item supervised ("no" colours may be absent)


def test_stage_e_from_a_stage_d_checkpoint_equals_the_full_run(trainer, tmp_path) -> None:
    """--init DIR (a stage-D checkpoint) then E, or the A-D run's state rerun with --steps-e, gives the weights the
    uninterrupted A-E run gives."""
    import torch
    from safetensors.torch import load_file

    tiny_run = ["--vision-layers", "2", "--text-layers", "3", "--batch-a", "4", "--batch", "6", "--steps-a", "2",
                "--steps-b", "1", "--steps-c", "1", "--steps-d", "1", "--final-eval-n", "1", "--save-every", "50"]
    assert trainer.main([*tiny_run, "--out", str(tmp_path / "full"), "--steps-e", "2"]) == 0
    assert trainer.main([*tiny_run, "--out", str(tmp_path / "d"), "--steps-e", "0"]) == 0
    assert trainer.main([*tiny_run, "--out", str(tmp_path / "e"), "--steps-e", "2", "--init", str(tmp_path / "d" / "final")]) == 0
    full, resumed = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("full", "e"))
    d_only = load_file(tmp_path / "d" / "final" / "model.safetensors")
    # the D-only run's own state (saved at E's first step) extended by E: E starts fresh there, not "inside E"
    assert trainer.main([*tiny_run, "--out", str(tmp_path / "d"), "--steps-e", "2"]) == 0
    extended = load_file(tmp_path / "d" / "final" / "model.safetensors")
    assert full.keys() == resumed.keys() == extended.keys()
    for name, w in full.items():
        assert torch.allclose(w, resumed[name], atol=1e-6), name
        assert torch.allclose(w, extended[name], atol=1e-6), name
    assert any(not torch.equal(w, d_only[name]) for name, w in full.items())  # stage E did train
    config = json.loads((tmp_path / "e" / "final" / "config.json").read_text())
    assert "eager" not in json.dumps(config)  # the checkpoint ships with the attention it was loaded with


def test_bridge_writes_the_probe_tsv_on_demand(tmp_path) -> None:
    """dataset=probe_vlmeval: the bridge exports the suite before anything loads (no VLMEvalKit needed)."""
    import yaml

    from prunebench.bridge.run import prepare_data
    from prunebench.cli import CONFIG_DIR

    d = yaml.safe_load((CONFIG_DIR / "dataset" / "probe_vlmeval.yaml").read_text())
    d.update(data_dir=str(tmp_path), export_args={"n": 12, "seed": 0, "image_size": 96, "families": ["reading"]})
    data = prepare_data({"dataset": d, "limit": None, "results_dir": str(tmp_path / "results")})
    _, rows = tsv.read_tsv(data.root / f"{data.name}.tsv")
    assert data.scorer == "shapes" and len(rows) == 12 and {r["category"] for r in rows} == {"reading"}
    assert [r["answer"] for r in rows] == [it.answer for it in probe.build_probe(12, families=["reading"])]


# ------------------------------------------------------- training script, Qwen2.5-VL family (--family qwen2_5_vl)

QWEN_SMALL = ["--family", "qwen2_5_vl", "--vision-layers", "2", "--text-layers", "2"]


def build_small(trainer, small: list[str]):
    """(args, model, processor) of a small model of a family."""
    args = trainer.parse(small)
    return (args, *trainer.build(args))


@pytest.fixture(scope="module")
def qwen_built(trainer):
    return build_small(trainer, QWEN_SMALL)


def test_qwen_sizes_give_the_llava_token_count(trainer, qwen_built) -> None:
    """96 px, patch 4, 2x2 merge -> 144 LLM tokens; 32 px windows: 8x8 patches, one probe cell each."""
    args, model, _ = qwen_built
    vision = model.config.vision_config
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert (args.patch_size, vision.spatial_merge_size, trainer.QwenProbe.grid(args)) == (4, 2, 12)
    assert vision.window_size // vision.patch_size == 8 and vision.window_size == 96 // probe.GRID
    assert trainer.parse(["--family", "qwen2_5_vl"]).out == Path("runs/probe_qwen25vl")
    assert (trainer.parse([]).out, trainer.parse([]).patch_size) == (Path("runs/probe_llava"), 8)


def test_qwen_training_inputs_equal_the_inference_path(trainer, qwen_built, tmp_path) -> None:
    """What the Qwen probe is trained on is what the runner feeds it through the saved processor: ids,
    pixel_values, image_grid_thw, mm_token_type_ids; blind = the text-only chat template."""
    import torch

    from prunebench.fixtures.tiny_qwen import load_qwen_processor

    args, model, processor = qwen_built
    model.config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = load_qwen_processor(tmp_path)
    prompts = trainer.Prompts(processor, 144)
    assert isinstance(prompts.family, trainer.QwenProbe)
    for it in probe.build_probe(6):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.question}]}]
        text = saved.apply_chat_template(conv, add_generation_prompt=True)
        inputs = saved(text=text, images=it.image, return_tensors="pt")
        ids = torch.tensor([prompts.prompt(it.question)])
        fed = prompts.family.vision_inputs([it.image], ids, torch.device("cpu"))
        assert inputs["input_ids"].tolist() == ids.tolist()
        assert int((ids == prompts.image_id).sum()) == 144
        for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):
            assert torch.equal(inputs[key], fed[key]), key
        text_only = [{"role": "user", "content": [{"type": "text", "text": it.question}]}]
        blind = saved(text=saved.apply_chat_template(text_only, add_generation_prompt=True), return_tensors="pt")
        assert blind["input_ids"][0].tolist() == prompts.prompt(it.question, blind=True)
        answer = prompts.answer(it.answer)
        assert len(answer) == 2 and answer[-1] == saved.tokenizer.eos_token_id  # one token, then <|im_end|>
        whole = saved.tokenizer(text + it.answer + "<|im_end|>")["input_ids"]
        assert whole == saved.tokenizer(text)["input_ids"] + answer  # prompt + labels tokenize as one text


def _zero_vision_attention(model) -> None:
    """Zero the vision tower's attention outputs: each visual token then depends only on its own patches."""
    import torch

    if hasattr(model.model, "visual"):  # Qwen2.5-VL
        projections = [block.attn.proj for block in model.model.visual.blocks]
    else:  # InternVL
        projections = [layer.attention.projection_layer for layer in model.model.vision_tower.encoder.layer]
    for proj in projections:
        torch.nn.init.zeros_(proj.weight)
        torch.nn.init.zeros_(proj.bias)


@pytest.mark.parametrize("built", ["qwen_built", "internvl_built"])
def test_token_order_matches_the_label_grid(trainer, built, request) -> None:
    """The 144 tokens the dense heads read (and the LLM receives) are in probe.patch_labels' row-major order
    (Qwen2.5-VL: the ViT's window permutation is undone; InternVL: the pixel shuffle keeps rows). With the
    vision attention outputs zeroed each token depends only on its own 2x2 patches, so one object changes
    exactly the tokens labelled with it (a transposed order would move row 0, col 2's object to row 2, col 0)."""
    import copy

    import torch

    args, model, processor = request.getfixturevalue(built)
    model = copy.deepcopy(model).eval()
    _zero_vision_attention(model)
    family = trainer.probe_family(processor)
    tap = family.tap(model)
    empty = probe.Scene("black", ())
    for obj in (probe.Obj("square", "red", 0, 2), probe.Obj("square", "white", 2, 1)):
        scene = probe.Scene("black", (obj,))
        with torch.no_grad():
            family.run_vision(model, [probe.render(empty), probe.render(scene)], torch.device("cpu"))
        assert tap.feats.shape == (2, 144, args.text_hidden)
        changed = ((tap.feats[1] - tap.feats[0]).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
        labelled = [i for i, k in enumerate(probe.patch_labels(scene, 12)["kind"]) if k > 0]
        assert changed == labelled and len(labelled) == 16
    tap.handle.remove()


def run_stages(trainer, small: list[str]):
    """Stages A-D, one step each, on a small model of a family: yields (stage, the top-level modules the step
    changed, the weights before it, the model), after checking which losses the stage has."""
    import torch

    args = trainer.parse(small + ["--batch-a", "2", "--batch", "2", "--steps-a", "1", "--steps-b", "1",
                                  "--steps-c", "1", "--steps-d", "1"])
    model, processor = trainer.build(args)
    heads = trainer.DenseHeads(trainer.FAMILIES[args.family].tap_hidden(args))
    opt = torch.optim.AdamW([{"params": list(model.parameters()) + list(heads.parameters())}], lr=1e-3)
    prompts = trainer.Prompts(processor, 144)
    tap = prompts.family.tap(model)
    for step, stage in enumerate("ABCD"):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        parts = trainer.train_step(step, args, model, heads, tap, prompts, opt, torch.device("cpu"), 12)
        assert ("qa" in parts) == (stage != "A") and ("dense" in parts) == (stage != "B")
        moved = {k.split(".")[k.startswith("model.")] for k, v in model.state_dict().items()
                 if not torch.equal(v, before[k])}
        yield stage, moved, before, model


def test_qwen_stages_train_the_right_parts(trainer) -> None:
    """Every stage runs on Qwen2.5-VL; stage B trains the merger (the projector) and the LLM, not the ViT."""
    import torch

    for stage, moved, before, model in run_stages(trainer, QWEN_SMALL):
        visual = model.model.visual
        if stage == "B":
            assert not any(p.grad is not None and p.requires_grad for p in visual.blocks.parameters())
            assert {"language_model", "lm_head"} <= moved
            assert any(not torch.equal(v, before[f"model.visual.merger.{k}"]) for k, v in visual.merger.state_dict().items())
            assert all(torch.equal(v, before[f"model.visual.blocks.{k}"]) for k, v in visual.blocks.state_dict().items())
        if stage == "A":
            assert moved == {"visual"}


# ----------------------------------------------------------- training script, InternVL3 family (--family internvl)

INTERNVL_SMALL = ["--family", "internvl", "--vision-layers", "2", "--text-layers", "2"]


@pytest.fixture(scope="module")
def internvl_built(trainer):
    return build_small(trainer, INTERNVL_SMALL)


def test_internvl_sizes_give_the_llava_token_count(trainer, internvl_built) -> None:
    """96 px as one tile, patch 4 -> 24x24 patches, CLS dropped, 2x2 pixel shuffle -> 144 LLM tokens."""
    args, model, processor = internvl_built
    config, vision = model.config, model.config.vision_config
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert (args.patch_size, tuple(vision.image_size), tuple(vision.patch_size)) == (4, (96, 96), (4, 4))
    assert (config.downsample_ratio, config.vision_feature_select_strategy, trainer.InternVLProbe.grid(args)) == \
        (0.5, "default", 12)
    assert processor.image_seq_length == config.image_seq_length == 144
    image_processor = processor.image_processor
    assert (image_processor.min_patches, image_processor.max_patches) == (1, 1)  # one tile, no thumbnail
    wide = Image.new("RGB", (300, 96))  # even an image the real model would tile stays one 96 px tile
    assert tuple(image_processor(wide, crop_to_patches=True, return_tensors="pt")["pixel_values"].shape) == (1, 3, 96, 96)
    assert trainer.parse(["--family", "internvl"]).out == Path("runs/probe_internvl3")
    assert trainer.parse(["--family", "internvl"]).patch_size == 4


def test_internvl_training_inputs_equal_the_inference_path(trainer, internvl_built, tmp_path) -> None:
    """What the InternVL probe is trained on is what the runner feeds it through the saved processor (loaded
    the way the loader does, without torchvision): ids with the <img> ... </img> block, pixel_values;
    blind = the text-only chat template."""
    import torch

    from prunebench.fixtures.tiny_families import load_processor

    args, model, processor = internvl_built
    model.config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = load_processor(tmp_path)
    prompts = trainer.Prompts(processor, 144)
    assert isinstance(prompts.family, trainer.InternVLProbe)
    assert isinstance(trainer.probe_family(saved), trainer.InternVLProbe)
    tok = saved.tokenizer
    for it in probe.build_probe(6):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.question}]}]
        text = saved.apply_chat_template(conv, add_generation_prompt=True)
        inputs = saved(text=text, images=it.image, return_tensors="pt")
        ids = prompts.prompt(it.question)
        fed = prompts.family.vision_inputs([it.image], torch.tensor([ids]), torch.device("cpu"))
        assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
        assert inputs["input_ids"][0].tolist() == ids
        at = ids.index(prompts.image_id)
        assert tok.convert_ids_to_tokens([ids[at - 1], ids[at + 144]]) == ["<img>", "</img>"]
        assert ids.count(prompts.image_id) == 144 and ids[at:at + 144] == [prompts.image_id] * 144
        assert torch.equal(inputs["pixel_values"], fed["pixel_values"])
        text_only = [{"role": "user", "content": [{"type": "text", "text": it.question}]}]
        blind = saved(text=saved.apply_chat_template(text_only, add_generation_prompt=True), return_tensors="pt")
        assert blind["input_ids"][0].tolist() == prompts.prompt(it.question, blind=True)
        assert not {prompts.image_id, *tok.convert_tokens_to_ids(["<img>", "</img>"])} & set(blind["input_ids"][0].tolist())
        answer = prompts.answer(it.answer)
        assert len(answer) == 2 and answer[-1] == tok.eos_token_id  # one token, then <|im_end|>
        whole = tok(text + it.answer + "<|im_end|>")["input_ids"]
        assert whole == tok(text)["input_ids"] + answer  # prompt + labels tokenize as one text


def test_internvl_pixel_shuffle_is_row_major(internvl_built) -> None:
    """HF's pixel_shuffle permutes twice (view, swap, view, swap back); its output token (R, C) holds the
    features of patches 2R..2R+1 x 2C..2C+1, in row-major order of the 12x12 grid."""
    import torch

    _, model, _ = internvl_built
    g = 24
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    feats = torch.stack([rows, cols], -1).float().view(1, g, g, 2)  # each patch's features: its (row, col)
    out = model.model.pixel_shuffle(feats, scale_factor=0.5).reshape(1, -1, 8)[0]  # as get_image_features
    assert out.shape == (144, 8)
    for t in range(144):
        r, c = divmod(t, 12)
        got = {(int(out[t, i]), int(out[t, i + 1])) for i in range(0, 8, 2)}
        assert got == {(2 * r + dr, 2 * c + dc) for dr in (0, 1) for dc in (0, 1)}, t


def test_internvl_stages_train_the_right_parts(trainer) -> None:
    """Every stage runs on InternVL3; stage A trains InternViT + projector (the heads read the projector), stage
    B the projector and the LLM, not InternViT."""
    for stage, moved, _, model in run_stages(trainer, INTERNVL_SMALL):
        if stage == "A":
            assert moved == {"vision_tower", "multi_modal_projector"}
        elif stage == "B":
            assert not any(p.grad is not None and p.requires_grad for p in model.model.vision_tower.parameters())
            assert moved == {"multi_modal_projector", "language_model", "lm_head"}
        else:
            assert moved == {"vision_tower", "multi_modal_projector", "language_model", "lm_head"}


def test_measure_probe_names_the_trained_probes_on_a_bad_model(capsys) -> None:
    """measure_probe --model with no config: one line naming the valid choices, the card found from the config."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "measure_probe.py"
    spec = importlib.util.spec_from_file_location("measure_probe", path)
    measure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measure)
    with pytest.raises(SystemExit):
        measure.parse(["--model", "nope"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--model nope" in err and "probe_llava" in err and "probe_qwen25vl" in err and "Traceback" not in err
    card = measure.parse(["--model", "probe_internvl3"]).card
    assert card.parts[-2:] == ("probe_internvl3", "README.md") and card.is_file()


# ------------------------------------------------------------------------------ stage E: length jitter


def test_jitter_cuts_only_object_free_tokens(trainer) -> None:
    """--jitter: a share of items lose some of the image tokens of their empty cells (never an object's), at most
    all but one cell's worth; a pure function of (seed, step, item)."""
    items = [probe.make_scene_qa(i, split="train-e") for i in range(240)]
    drops = trainer.jitter_drops(0, 7, items, 12, 0.5)
    assert drops == trainer.jitter_drops(0, 7, items, 12, 0.5) != trainer.jitter_drops(0, 8, items, 12, 0.5)
    assert not any(trainer.jitter_drops(0, 7, items, 12, 0.0))
    assert all(trainer.jitter_drops(0, 7, items, 12, 1.0))
    cut = [d for d in drops if d]
    assert 0.35 < len(cut) / len(items) < 0.65
    for (_, scene, _, _), drop in zip(items, drops, strict=True):
        full = {(o.row, o.col) for o in scene.objects}
        assert all((i // 12 // 4, i % 12 // 4) not in full for i in drop)
        assert drop == sorted(set(drop)) and all(0 <= i < 144 for i in drop) and 144 - len(drop) >= 16
    seen = [144 - len(d) for d in cut]
    assert min(seen) <= 40 and max(seen) >= 120  # the blocks the LLM sees span short to nearly full


def test_compact_batch_equals_each_cut_sequence_alone(trainer, internvl_built) -> None:
    """Compact (per-item cuts at the LLM entry, right padding) gives each item the logits of its own cut
    sequence run alone with positions 0..n-1; labels, the last prompt row and stage E's attention targets move
    with their tokens; the hook is gone after remove(); with no cut, the loss is the model's own."""
    import torch

    args, model, processor = internvl_built
    was_training = model.training
    model.eval()
    prompts = trainer.Prompts(processor, 144)
    items = [probe.make_scene_qa(i, split="train-e") for i in (0, 1, 2)]  # existence, attribute, count
    ids, mask, lab, last = trainer.batch_tensors(prompts, [(q, a) for _, _, q, a in items])
    vision = prompts.family.vision_inputs([probe.render(s) for _, s, _, _ in items], ids, torch.device("cpu"))
    starts = [prompts.prompt(q).index(prompts.image_id) for _, _, q, _ in items]
    drops = [list(range(0, 144, 2)), [], [5, 6, 7, 100]]
    drops = [[i for i in d if i in trainer.empty_tokens(s, 12)] for d, (_, s, _, _) in zip(drops, items, strict=True)]
    assert drops[0] and drops[2]
    rows = [[at + i for i in d] for at, d in zip(starts, drops, strict=True)]
    embeds = []
    grab = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: embeds.append(kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, labels=lab, **vision)
        cut = trainer.Compact(mask, rows).install(model)
        logits = model(input_ids=ids, attention_mask=mask, **vision).logits
        cut.remove()
        grab.remove()
        for b, gone in enumerate(rows):
            kept = [p for p in range(int(mask[b].sum())) if p not in gone]
            alone = model.model.language_model(inputs_embeds=embeds[0][b:b + 1, kept]).last_hidden_state
            assert torch.allclose(logits[b, :len(kept)], model.lm_head(alone)[0], atol=1e-5)
            assert cut.labels(lab)[b, :len(kept)].tolist() == lab[b, kept].tolist()
            assert (cut.labels(lab)[b, len(kept):] == -100).all() and cut.mask[b].sum() == len(kept)
            assert ids[b, kept[int(cut.last(last)[b])]] == ids[b, last[b]] and int(cut.last(last)[b]) == len(kept) - 3
            family, scene, question, answer = items[b]
            for _, _, query, keys in trainer.supervision(prompts, family, scene, question, answer, 12):
                moved = cut.moved[b, keys]
                assert (moved >= 0).all() and ids[b, kept][moved].tolist() == ids[b, keys].tolist()
                if query is not None:
                    assert ids[b, kept[int(cut.moved[b, query])]] == ids[b, query]
        assert torch.equal(model(input_ids=ids, attention_mask=mask, **vision).logits, full.logits)  # hook removed
        assert torch.allclose(trainer.causal_lm_loss(full.logits, lab), full.loss, atol=1e-6)
        none = trainer.Compact(mask, [[], [], []]).install(model)
        same = model(input_ids=ids, attention_mask=mask, **vision).logits
        none.remove()
        real = mask.bool()  # the padding rows differ (Compact pads with the last real row) and are never read
        assert torch.allclose(same[real], full.logits[real], atol=1e-5)
    model.train(was_training)


def test_stage_e_with_jitter_trains_and_says_so(trainer, tmp_path) -> None:
    """--jitter changes stage E's weights, and the card's command and recipe name it."""
    import torch
    from safetensors.torch import load_file

    tiny_run = ["--family", "internvl", "--vision-layers", "2", "--text-layers", "3", "--batch-a", "2", "--batch", "4", "--steps-a", "1", "--steps-b", "1", "--steps-c", "1",
                "--steps-d", "1", "--steps-e", "2", "--final-eval-n", "1", "--save-every", "50"]
    assert trainer.main([*tiny_run, "--out", str(tmp_path / "plain")]) == 0
    assert trainer.main([*tiny_run, "--out", str(tmp_path / "jitter"), "--jitter", "1.0"]) == 0
    plain, jitter = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("plain", "jitter"))
    assert any(not torch.equal(w, jitter[k]) for k, w in plain.items())
    card = (tmp_path / "jitter" / "final" / "README.md").read_text()
    assert "--jitter 1.0" in card and "length jitter on 100% of E's items" in card
    assert "--jitter" not in (tmp_path / "plain" / "final" / "README.md").read_text()



@pytest.mark.parametrize(("target", "checkpoint"), [("probe", "probe_llava"), ("probe-qwen", "probe_qwen25vl"),
                                                    ("probe-internvl", "probe_internvl3")])
def test_make_target_retrains_the_committed_probe(trainer, target: str, checkpoint: str) -> None:
    """`make probe*` runs the recipe the committed checkpoint's card states (every training argument)."""
    import shlex

    make = (ROOT / "Makefile").read_text()
    recipes = dict(re.findall(r"^(\w+_RECIPE)\s*\?=\s*(.*)$", make, re.M))
    line = re.search(rf"^{re.escape(target)}:.*\n\t(.*train_probe\.py.*)$", make, re.M).group(1)
    line = re.sub(r"\$\((\w+_RECIPE)\)", lambda m: recipes[m.group(1)], line).replace("$(ARGS)", "")
    made = trainer.parse(shlex.split(line.split("train_probe.py", 1)[1]))
    card = (ROOT / "checkpoints" / checkpoint / "README.md").read_text()
    command = re.search(r"- command: `python scripts/train_probe\.py([^`]*)`", card).group(1)
    stated = trainer.parse(shlex.split(command))
    assert {k: v for k, v in vars(made).items() if k != "init"} == {k: v for k, v in vars(stated).items() if k != "init"}


@pytest.mark.parametrize(("argv", "says"), [(["--jitter", "1.5"], "0 to 1"),
                                            (["--jitter", "0.5", "--family", "qwen2_5_vl"], "llava, internvl")])
def test_bad_jitter_is_a_one_line_error(trainer, tmp_path, argv: list[str], says: str) -> None:
    with pytest.raises(SystemExit) as err:
        trainer.main([*argv, "--out", str(tmp_path / "run")])
    assert says in str(err.value) and "\n" not in str(err.value) and not (tmp_path / "run").exists()
