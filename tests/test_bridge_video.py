"""VLMEvalKit's video sets through the bridge.

Pure parts run always (message -> one video for the family's processor, frame sampling, data checks,
score tables). End to end (marked `vlmeval`, skipped where VLMEvalKit does not import): generated
tiny Video-MME-, MVBench- and LongVideoBench-format folders (mp4 videos + TSV, no network) answered
by the tiny LLaVA-OneVision through VLMEvalKit's own loaders, frame sampling and scorers; the
record's score must equal what VLMEvalKit's `evaluate` gives on the prediction file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from prunebench.bridge import messages, scores, tsv, video
from prunebench.cli import CONFIG_DIR
from prunebench.errors import UserError

# ----------------------------------------------------------------------------------- messages (pure)


def _frames(tmp_path: Path, n: int = 4, image_size: int = 48) -> tuple[list[str], Any]:
    from prunebench.data.shapes_video import make_video

    item = make_video(0, image_size=image_size, source_frames=24, num_frames=n)
    paths = []
    for i, frame in enumerate(item.frames):
        frame.save(tmp_path / f"f{i}.png")
        paths.append(str(tmp_path / f"f{i}.png"))
    return paths, item


def test_frames_become_one_video_where_the_first_frame_was() -> None:
    msg = [{"type": "text", "value": ""}, {"type": "text", "value": "SYS", "role": "system"},
           *({"type": "image", "value": f"/f{i}.jpg"} for i in range(3)),
           {"type": "text", "value": "Q?"}, {"type": "text", "value": "Best option:(", "role": "assistant"}]
    conv, frames, path = messages.to_video_conversation(msg)
    assert frames == ["/f0.jpg", "/f1.jpg", "/f2.jpg"] and path is None
    assert conv == [{"role": "user", "content": [{"type": "text", "text": "SYS"}, {"type": "video"},
                                                  {"type": "text", "text": "Q?\nBest option:("}]}]


def test_a_video_part_is_the_video() -> None:
    conv, frames, path = messages.to_video_conversation([{"type": "video", "value": "/v.mp4"},
                                                          {"type": "text", "value": "Q"}])
    assert frames == [] and path == "/v.mp4" and [c["type"] for c in conv[0]["content"]] == ["video", "text"]


@pytest.mark.parametrize("msg", [
    [{"type": "text", "value": "no video"}],
    [{"type": "video", "value": "/a.mp4"}, {"type": "video", "value": "/b.mp4"}],
    [{"type": "image", "value": "/f.jpg"}, {"type": "video", "value": "/b.mp4"}],
    [{"type": "video", "value": "/a.mp4"}, {"type": "image", "value": "/f.jpg"}],
    [{"type": "audio", "value": "/a.wav"}, {"type": "video", "value": "/a.mp4"}],
])
def test_video_messages_that_cannot_be_one_video_are_refused(msg) -> None:
    with pytest.raises(UserError, match="valid"):
        messages.to_video_conversation(msg)


@pytest.mark.parametrize("n,k", [(90, 8), (100, 8), (7, 8), (300, 64), (1, 1)])
def test_uniform_indices_follow_vlmevalkits_nframe_sampling(n: int, k: int) -> None:
    # VLMEvalKit (video_base.py / videomme.py / longvideobench.py): the interior points of k+1 equal
    # segments of the n frames, truncated, in floating point as it computes them (step first)
    step = n / (k + 1)
    got = messages.uniform_indices(n, k)
    assert got == [int(step * i) for i in range(1, k + 1)]
    exact = [max(j for j in range(n + 1) if j * (k + 1) <= i * n) for i in range(1, k + 1)]  # brute force
    assert all(e - 1 <= g <= e for g, e in zip(got, exact, strict=True))  # float truncation: at most one below
    with pytest.raises(UserError, match="valid: nframe >= 1"):
        messages.uniform_indices(n, 0)


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    from conftest import load_tiny, tiny_checkpoint

    return load_tiny(tiny_checkpoint("llava_onevision", tmp_path_factory), family="llava_onevision")


def test_video_message_gives_the_runners_video_inputs(onevision, tmp_path: Path) -> None:
    """Frames as image parts + the question give exactly what the built-in runner builds for that video."""
    from PIL import Image

    paths, item = _frames(tmp_path)
    got = messages.build_video_inputs(onevision.processor, [*({"type": "image", "value": p} for p in paths),
                                                            {"type": "text", "value": item.question}], nframe=4)
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": item.question}]}]
    prompt = onevision.processor.apply_chat_template(conv, add_generation_prompt=True)
    frames = [Image.open(p).convert("RGB") for p in paths]  # PNG round trip is lossless
    want = onevision.processor(text=prompt, videos=[frames], return_tensors="pt")
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert torch.equal(got["pixel_values_videos"], want["pixel_values_videos"])
    assert got["pixel_values_videos"].shape[1] == 4 and "pixel_values" not in got


def test_families_without_a_video_processor_are_refused() -> None:
    from types import SimpleNamespace

    from prunebench.bridge.run import check_video_processor

    qwen = SimpleNamespace(name="tiny_qwen25vl", processor=SimpleNamespace(video_processor=None))
    with pytest.raises(UserError, match="no video processor here; valid: .*llava_onevision"):
        check_video_processor(qwen, "Video-MME")
    check_video_processor(SimpleNamespace(name="ov", processor=SimpleNamespace(video_processor=object())), "MVBench")


# --------------------------------------------------------------------------------- data checks (pure)


def _cfg(name: str, folder: Path, **extra: Any) -> dict[str, Any]:
    d = yaml.safe_load((CONFIG_DIR / "dataset" / f"{name}.yaml").read_text())
    d.update(data_dir=str(folder), **extra)
    return {"dataset": d, "limit": None, "results_dir": str(folder / "results")}


def test_every_video_yaml_states_its_frame_policy_and_data() -> None:
    for name, spec in video.VIDEO_SETS.items():
        d = yaml.safe_load((CONFIG_DIR / "dataset" / f"{name}.yaml").read_text())
        assert d["modality"] == "video" and d["kind"] == "vlmeval" and d["name"] == name
        assert video.frame_policy(d) == (8, -1.0) and len(d["md5"]) == 32
        scores.check_mapping(d["score"])
        assert spec.repo_id in (CONFIG_DIR / "dataset" / f"{name}.yaml").read_text()


@pytest.mark.parametrize("extra,match", [({"nframe": 8, "fps": 1.0}, "exactly one of nframe"),
                                         ({"nframe": None, "fps": None}, "exactly one of nframe"),
                                         ({"nframe": None, "fps": 1.0, "name": "MVBench"}, "frame count only")])
def test_frame_policy_refuses_bad_settings(extra, match) -> None:
    d = {"name": "Video-MME", **extra}
    with pytest.raises(UserError, match=match):
        video.frame_policy(d)


def _videomme_rows(n: int) -> list[dict[str, Any]]:
    return [{"index": i, "video": f"v{i}", "video_path": f"./video/v{i}.mp4", "duration": "short",
             "domain": "Knowledge", "candidates": str([f"{c}. opt{c}" for c in "ABCD"]), "sub_category": "Astronomy",
             "task_type": ("Counting Problem", "OCR Problems")[i % 2], "subtitle_path": f"./subtitle/v{i}.srt",
             "question": f"Question {i}?", "answer": "ABCD"[i % 4]} for i in range(n)]


def test_video_data_checks_name_the_file_and_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    from prunebench.bridge import run

    def refuse():
        raise AssertionError("VLMEvalKit or the model was reached before the data checks")

    monkeypatch.setattr(run, "vlmeval_api", refuse)
    with pytest.raises(UserError, match=r"Video-MME\.tsv is missing; download the HF dataset lmms-lab/Video-MME"):
        run.run_vlmeval(_cfg("Video-MME", tmp_path))
    rows = _videomme_rows(4)
    tsv.write_tsv(tmp_path / "Video-MME.tsv", list(rows[0]), rows)
    with pytest.raises(UserError, match="has MD5 .* expected 85bdd91f"):
        run.prepare_data(_cfg("Video-MME", tmp_path))
    with pytest.raises(UserError, match=r"4 video\(s\) .* missing .* e\.g\. \./video/v0\.mp4"):
        run.prepare_data(_cfg("Video-MME", tmp_path, md5=None))
    (tmp_path / "video").mkdir()
    for i in range(4):
        (tmp_path / "video" / f"v{i}.mp4").write_bytes(b"")
    data = run.prepare_data(_cfg("Video-MME", tmp_path, md5=None, limit=2))
    assert (data.name, data.base, data.nframe, data.modality) == ("Video-MME_pbsub2s0", "Video-MME", 8, "video")
    _, sub = tsv.read_tsv(tmp_path / "Video-MME_pbsub2s0.tsv")
    assert {r["task_type"] for r in sub} == {"Counting Problem", "OCR Problems"}  # stratified by task type
    with pytest.raises(UserError, match="lacks the column.*prefix"):  # a Video-MME TSV is not MVBench's format
        shutil.copy(tmp_path / "Video-MME.tsv", tmp_path / "MVBench.tsv")
        run.prepare_data(_cfg("MVBench", tmp_path, md5=None))


def test_default_folder_is_the_newest_hub_snapshot_and_private_hub_is_undone(tmp_path: Path, monkeypatch) -> None:
    import os
    import time

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert video.default_folder("lmms-lab/Video-MME") is None
    old = hub / "datasets--lmms-lab--Video-MME" / "snapshots" / "aaa"
    old.mkdir(parents=True)
    time.sleep(0.01)
    new = old.parent / "bbb"
    new.mkdir()
    os.utime(old, (1, 1))
    assert video.default_folder("lmms-lab/Video-MME") == new
    data = tmp_path / "data"
    data.mkdir()
    with video.private_hub(tmp_path / "work", "OpenGVLab/MVBench", data):
        inner = Path(os.environ["HF_HUB_CACHE"])
        assert video.default_folder("OpenGVLab/MVBench").resolve() == data.resolve()
        assert (inner / "datasets--OpenGVLab--MVBench" / "refs" / "main").read_text() == "local"
    assert os.environ["HF_HUB_CACHE"] == str(hub)


# ------------------------------------------------------------------------------------ scores (pure)


def test_mvbench_and_videomme_tables_flatten_to_their_main_scores() -> None:
    mv = {"Action Count": [1, 2, "50.00%"], "Moving Direction": [0, 1, "0.00%"], "overall": [1, 3, "33.33%"]}
    flat = scores.flatten(mv)
    assert flat["overall|0"] == 1 and flat["overall|1"] == 3 and flat["Action Count|2"] == 50.0
    spec = yaml.safe_load((CONFIG_DIR / "dataset" / "MVBench.yaml").read_text())["score"]
    assert scores.main_score(flat, spec, 3) == pytest.approx(33.33)
    vm = {"short": {"overall": "0.500", "domain": {"Knowledge": "0.500"}}, "overall": {"overall": "0.250"}}
    spec = yaml.safe_load((CONFIG_DIR / "dataset" / "Video-MME.yaml").read_text())["score"]
    assert scores.main_score(scores.flatten(vm), spec, 4) == pytest.approx(25.0)


# ------------------------------------------------------------------------ end to end (VLMEvalKit)

vlmeval_only = pytest.mark.skipif(
    __import__("prunebench.bridge.isolate", fromlist=["x"]).vlmeval_missing_reason() is not None,
    reason="VLMEvalKit is not importable (optional backend)")


def write_mp4(path: Path, frames: list[Any], fps: float = 8.0) -> None:
    """An mp4 (mp4v) of PIL frames, readable by decord, as VLMEvalKit's loaders need."""
    import cv2
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = frames[0].size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(np.asarray(frame.convert("RGB")), cv2.COLOR_RGB2BGR))
    writer.release()


def _videos(n: int) -> list[list[Any]]:
    from prunebench.data.shapes_video import make_video

    # 64 px: decord 0.6 misreads frames whose width is not a multiple of 32 (48 px came back RGBA)
    return [list(make_video(i, image_size=64, source_frames=24, num_frames=24).frames) for i in range(n)]


def write_videomme(folder: Path, name: str) -> None:
    """Video-MME's columns (VideoMME.prepare_dataset's generate_tsv), 4 videos x 2 questions."""
    clips = _videos(4)
    rows = []
    for i in range(8):
        v = i // 2
        write_mp4(folder / "video" / f"vid{v}.mp4", clips[v])
        rows.append({"index": i, "video": f"vid{v}", "video_path": f"./video/vid{v}.mp4",
                     "duration": ("short", "medium")[v % 2], "domain": ("Knowledge", "Life Record")[v % 2],
                     "candidates": str(["A. left", "B. right", "C. up", "D. down"]),
                     "sub_category": ("Astronomy", "Travel")[v % 2],
                     "task_type": ("Temporal Perception", "Counting Problem")[i % 2],
                     "subtitle_path": f"./subtitle/vid{v}.srt", "question": f"Where does shape {i} move?",
                     "answer": "ABCD"[i % 4]})
    tsv.write_tsv(folder / f"{name}.tsv", list(rows[0]), rows)


def write_mvbench(folder: Path, name: str) -> None:
    """MVBench's columns (MVBench.prepare_dataset's generate_tsv), plain videos without a time bound."""
    clips = _videos(6)
    rows = []
    for i in range(6):
        write_mp4(folder / "video" / "clevrer" / "video_validation" / f"video_{i}.mp4", clips[i])
        options = ["left", "right", "up"]
        rows.append({"task_type": ("Moving Direction", "Action Count")[i % 2],
                     "prefix": "video/clevrer/video_validation/", "data_type": "video", "bound": False,
                     "start": "", "end": "", "video": f"video_{i}.mp4", "question": "Where does the shape move?",
                     "answer": options[i % 3], "candidates": str(options), "index": i})
    tsv.write_tsv(folder / f"{name}.tsv", list(rows[0]), rows)


def write_longvideobench(folder: Path, name: str) -> None:
    """LongVideoBench's columns (LongVideoBench.prepare_dataset's generate_tsv)."""
    clips = _videos(6)
    rows = []
    for i in range(6):
        write_mp4(folder / "videos" / f"lvb{i}.mp4", clips[i])
        rows.append({"video_id": f"lvb{i}", "video": f"lvb{i}", "video_path": f"./videos/lvb{i}.mp4",
                     "question": "Where does the shape move?", "candidates": str(["left", "right", "up", "down"]),
                     "correct_choice": i % 4, "duration_group": (15, 60)[i % 2],
                     "question_category": ("S2E", "T3O")[i % 2], "duration": 3.0, "subtitle_path": "none.json",
                     "starting_timestamp_for_subtitles": 0, "index": i})
    tsv.write_tsv(folder / f"{name}.tsv", list(rows[0]), rows)


CLASSES = {"Video-MME": "VideoMME", "MVBench": "MVBench", "LongVideoBench": "LongVideoBench"}


def config(path: Path, results: Path, dataset: dict[str, Any], method: str = "random_pre",
           keep: float = 0.34) -> dict[str, Any]:
    cfg = {k: v for k, v in yaml.safe_load((CONFIG_DIR / "config.yaml").read_text()).items()
           if k not in ("defaults", "hydra")}
    model = yaml.safe_load((CONFIG_DIR / "model" / "tiny_onevision.yaml").read_text())
    m = yaml.safe_load((CONFIG_DIR / "method" / f"{method}.yaml").read_text())
    cfg.update(model={**model, "path": str(path)}, method=m, dataset=dataset, results_dir=str(results),
               device="cpu", keep=keep, baseline=False, report=False)
    return cfg


def reference(record_path: Path, base: str, name: str, tmp: Path) -> dict[str, float]:
    """VLMEvalKit's own (class-method) evaluate on a copy of the run's prediction file."""
    from prunebench.bridge.isolate import contained, vlmeval_api
    from prunebench.record import load_record

    rec = load_record(record_path)
    pred = record_path.parent / "vlmeval" / f"{rec.benchmark['model_name']}_{name}.xlsx"
    copy = tmp / "ref" / pred.name
    copy.parent.mkdir()
    shutil.copy(pred, copy)
    cls = next(c for c in vlmeval_api().dataset_classes if c.__name__ == CLASSES[base])
    with contained():
        return scores.flatten(cls.evaluate(str(copy), model="exact_matching"))


def _fixed_answer(monkeypatch, text: str) -> None:
    from prunebench import generation

    real = generation.generate_timed
    monkeypatch.setattr(generation, "generate_timed", lambda *a, **k: {**real(*a, **k), "text": text})


@vlmeval_only
@pytest.mark.vlmeval
@pytest.mark.parametrize("answer", [None, "fixed"])
@pytest.mark.parametrize("base,writer,fixed,want", [
    ("Video-MME", write_videomme, "A", 100 * 2 / 8),          # answers cycle A-D over 8 questions
    ("MVBench", write_mvbench, "(A) left", 100 * 2 / 6),      # 'left' is option A of 2 of 6
    ("LongVideoBench", write_longvideobench, "A", 100 * 2 / 6),
])
def test_video_record_score_equals_vlmevalkit_evaluate(tmp_path_factory, tmp_path, monkeypatch, base, writer,
                                                       fixed, want, answer) -> None:
    from conftest import tiny_checkpoint

    from prunebench.bridge.run import run_vlmeval
    from prunebench.record import load_record

    folder, name = tmp_path / "data", f"{base}_pbtiny"
    writer(folder, name)
    if answer == "fixed":
        _fixed_answer(monkeypatch, fixed)
    d = yaml.safe_load((CONFIG_DIR / "dataset" / f"{base}.yaml").read_text())
    d.update(name=name, base=base, md5=None, data_dir=str(folder), nframe=4, max_new_tokens=3)
    path = run_vlmeval(config(tiny_checkpoint("llava_onevision", tmp_path_factory), tmp_path / "results", d),
                       quiet=True)
    rec = load_record(path)
    flat = reference(path, base, name, tmp_path)
    assert rec.status == "complete" and rec.metrics == pytest.approx(flat)
    assert rec.score == pytest.approx(scores.main_score(flat, d["score"], rec.n_samples))
    if answer == "fixed":
        assert rec.score == pytest.approx(want, abs=0.05)  # VLMEvalKit rounds: 0.333, "33.33%"
    rows = [json.loads(x) for x in (path.parent / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == rec.n_samples and len({str(r["index"]) for r in rows}) == rec.n_samples
    # 4 frames of 3x3 pooled tokens + one newline; random_pre keeps round(0.34 * 9) = 3 per frame
    assert all(r["n_frames"] == 4 and r["n_visual_in"] == 37 and r["n_visual_out"] == 13 for r in rows)
    assert rec.tokens["n_frames"] == 4 and rec.tokens["per_frame_out"] == 3
    assert rec.benchmark["nframe"] == 4 and rec.benchmark["scored_as"] == base
    frames = sorted((folder / "images" / name).rglob("frame-*-of-4.jpg"))
    assert frames, "VLMEvalKit's own frame extraction wrote the sampled frames"


@vlmeval_only
@pytest.mark.vlmeval
def test_video_llm_mode_decodes_the_file_and_matches_frames_mode(tmp_path_factory, tmp_path) -> None:
    """video_llm=true: VLMEvalKit sends the mp4; the bridge samples the same frame indices itself."""
    from conftest import tiny_checkpoint

    from prunebench.bridge.run import run_vlmeval
    from prunebench.record import load_record

    folder, name = tmp_path / "data", "Video-MME_pbtiny"
    write_videomme(folder, name)
    d = yaml.safe_load((CONFIG_DIR / "dataset" / "Video-MME.yaml").read_text())
    d.update(name=name, base="Video-MME", md5=None, data_dir=str(folder), nframe=4, max_new_tokens=3)
    ckpt = tiny_checkpoint("llava_onevision", tmp_path_factory)
    runs = {}
    for mode in (False, True):
        path = run_vlmeval(config(ckpt, tmp_path / f"results{mode}", {**d, "video_llm": mode}), quiet=True)
        rows = [json.loads(x) for x in (path.parent / "predictions.jsonl").read_text().splitlines()]
        runs[mode] = rows
        assert load_record(path).benchmark["video_llm"] is mode
    assert all(r["n_frames"] == 4 for r in runs[True])
    assert [r["prompt_len"] for r in runs[True]] == [r["prompt_len"] for r in runs[False]]
