"""The VLMEvalKit bridge's pure parts: run always, no VLMEvalKit needed."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path

import pytest

from prunebench.bridge import messages, naming, scores, tsv
from prunebench.errors import UserError

# ------------------------------------------------------------------------------------------- naming


def test_model_name_is_stable_and_distinguishes_every_axis() -> None:
    base = dict(model="tiny_llava", method="fastv", params={"layer": 2}, keep=0.111, seed=0)
    name = naming.model_name(**base)
    assert name == naming.model_name(**base)  # stable
    variants = [dict(base, model="llava15"), dict(base, method="divprune"), dict(base, params={"layer": 3}),
                dict(base, keep=0.222), dict(base, seed=1), dict(base, positions="renumber")]
    names = {naming.model_name(**v) for v in variants}
    assert name not in names and len(names) == len(variants)


def test_model_name_is_a_safe_directory_name_without_underscores() -> None:
    name = naming.model_name("org/My_Model v2", "a_b", {}, 1.0, 0)
    assert "/" not in name and " " not in name and "_" not in name
    assert name.endswith("~k1.000~s0")


# ----------------------------------------------------------------------------------------- messages


def test_conversation_keeps_interleaving_and_joins_text() -> None:
    msg = [{"type": "text", "value": "Look:"}, {"type": "image", "value": "/a.png"},
           {"type": "text", "value": "and"}, {"type": "image", "value": "/b.png"},
           {"type": "text", "value": "Q?"}, {"type": "text", "value": "Answer yes or no."}]
    conv, paths = messages.to_conversation(msg)
    assert paths == ["/a.png", "/b.png"]
    assert [c["type"] for c in conv[0]["content"]] == ["text", "image", "text", "image", "text"]
    assert conv[0]["content"][-1]["text"] == "Q?\nAnswer yes or no."


@pytest.mark.parametrize("msg", [[{"type": "text", "value": "no image"}],
                                 [{"type": "audio", "value": "x.wav"}, {"type": "image", "value": "a"}]])
def test_conversation_rejects_what_it_cannot_prune(msg) -> None:
    with pytest.raises(UserError, match="valid"):
        messages.to_conversation(msg)


def test_build_inputs_matches_the_runner_path(tiny, tmp_path: Path) -> None:
    """A one-image message gives exactly the inputs the foundation's runner builds for that item."""
    from prunebench.data.shapes import make_sample

    item = make_sample(3, image_size=tiny.image_side)
    item.image.save(tmp_path / "x.png")
    got = messages.build_inputs(tiny.processor, [{"type": "image", "value": str(tmp_path / "x.png")},
                                                 {"type": "text", "value": item.question}])
    want = tiny.inputs(item.question, seed=3)
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert (got["pixel_values"] == want["pixel_values"]).all()


# ------------------------------------------------------------------------------------------- scores


def _mme_table() -> dict[str, float]:
    cats = ["OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters",
            "scene", "code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation"]
    rng = random.Random(1)
    table = {c: rng.uniform(0, 200) for c in cats}
    table["perception"] = sum(table[c] for c in cats[:10])
    table["reasoning"] = sum(table[c] for c in cats[10:])
    return table


def test_mme_is_perception_plus_cognition_over_2800() -> None:
    table = _mme_table()
    got = scores.main_score(scores.flatten(table), {"sum": ["perception", "reasoning"], "max": 2800}, 2374)
    assert got == pytest.approx(100 * (table["perception"] + table["reasoning"]) / 2800)
    perfect = {k: 200.0 for k in table} | {"perception": 2000.0, "reasoning": 800.0}
    assert scores.main_score(perfect, {"sum": ["perception", "reasoning"], "max": 2800}, 1) == 100.0


class _Frame:
    """The two DataFrame methods `flatten` uses (pandas is not a prunebench dependency)."""

    def __init__(self, records: list[dict]) -> None:
        self.records, self.columns = records, list(records[0])

    def to_dict(self, orient: str) -> list[dict]:
        assert orient == "records"
        return self.records


def test_pope_is_the_overall_f1_row() -> None:
    frame = _Frame([{"split": "Overall", "Overall": 85.5, "acc": 86.0},
                    {"split": "adversarial", "Overall": 80.0, "acc": 81.0}])
    flat = scores.flatten(frame)
    assert flat == {"Overall|Overall": 85.5, "Overall|acc": 86.0, "adversarial|Overall": 80.0,
                    "adversarial|acc": 81.0}
    assert scores.main_score(flat, {"key": "Overall|Overall"}, 10) == 85.5


def test_mmbench_overall_from_a_single_split_as_percent() -> None:
    flat = scores.flatten(_Frame([{"split": "dev", "Overall": 0.625, "AR": 0.5}]))
    assert scores.main_score(flat, {"key": "Overall", "scale": 100}, 8) == 62.5


def test_ocrbench_final_score_per_sample() -> None:
    table = {"Text Recognition": 200, "Final Score": 640, "Final Score Norm": 64.0}
    assert scores.main_score(scores.flatten(table), {"key": "Final Score", "per_sample": 1}, 1000) == 64.0
    assert scores.main_score(scores.flatten(table), {"key": "Final Score", "per_sample": 1}, 800) == 80.0


@pytest.mark.parametrize("spec", [{"key": "Overall", "sum": ["a"]}, {"max": 2}, {"key": "Overall", "max": 1,
                                                                                 "scale": 2},
                                  {"key": "Overall", "bogus": 1}, {"key": "nope"}])
def test_bad_mappings_and_keys_are_one_line_errors(spec) -> None:
    with pytest.raises(UserError, match="valid"):
        scores.main_score({"dev|Overall": 1.0}, spec, 1)


# ---------------------------------------------------------------------------------------------- tsv


def _rows(n_images: int = 30) -> list[dict[str, str]]:
    cats = ["color", "count", "OCR"]
    rows = []
    for i in range(n_images):
        for q in range(2):  # MME: two questions per image
            rows.append({"index": str(2 * i + q), "image": f"IMG{i}" * 20 if q == 0 else str(2 * i),
                         "image_path": f"img{i}.jpg", "question": f"q{i}-{q}", "answer": "Yes",
                         "category": cats[i % 3]})
    return rows


def test_subset_is_reproducible_balanced_and_keeps_pairs() -> None:
    rows = _rows()
    a = tsv.subset_rows(rows, 12, seed=0, group_by="image_path")
    assert a == tsv.subset_rows(rows, 12, seed=0, group_by="image_path")
    assert a != tsv.subset_rows(rows, 12, seed=1, group_by="image_path")
    assert len(a) == 12
    assert all(n == 2 for n in Counter(r["image_path"] for r in a).values())  # whole pairs
    assert Counter(r["category"] for r in a) == {"color": 4, "count": 4, "OCR": 4}  # round-robin
    order = [int(r["index"]) for r in a]
    assert order == sorted(order)


def test_subset_never_exceeds_limit_and_takes_all_when_large() -> None:
    rows = _rows(5)
    assert len(tsv.subset_rows(rows, 5, seed=0, group_by="image_path")) <= 5
    assert tsv.subset_rows(rows, 1000, seed=0, group_by="image_path") == rows
    with pytest.raises(UserError):
        tsv.subset_rows(rows, 0, seed=0)


def test_subset_groups_mmbench_circular_variants() -> None:
    rows = [{"index": str(k * 1_000_000 + q), "category": "a"} for q in range(6) for k in range(3)]
    got = tsv.subset_rows(rows, 6, seed=0, group_by="index_mod:1000000")
    assert len(got) == 6 and len({int(r["index"]) % 1_000_000 for r in got}) == 2


def test_write_subset_resolves_image_references(tmp_path: Path) -> None:
    rows = _rows()
    tsv.write_tsv(tmp_path / "MME.tsv", list(rows[0]), rows)
    name, path = tsv.write_subset(tmp_path, "MME", 10, seed=0, group_by="image_path")
    assert name == "MME_pbsub10s0" and path == tmp_path / "MME_pbsub10s0.tsv"
    _, back = tsv.read_tsv(path)
    assert len(back) == 10 and all(len(r["image"]) > tsv.IMAGE_REF_MAX for r in back)
    # the same command writes the same bytes
    first = path.read_bytes()
    tsv.write_subset(tmp_path, "MME", 10, seed=0, group_by="image_path")
    assert path.read_bytes() == first


def test_check_data_names_the_file_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"MME\.tsv is missing; download https://x/MME\.tsv"):
        tsv.check_data(tmp_path, "MME", "0" * 32, "https://x/MME.tsv")
    (tmp_path / "MME.tsv").write_text("index\tquestion\n1\tq\n")
    with pytest.raises(UserError, match="has MD5 .* expected 0{32}"):
        tsv.check_data(tmp_path, "MME", "0" * 32, "https://x/MME.tsv")
    good = hashlib.md5((tmp_path / "MME.tsv").read_bytes()).hexdigest()
    assert tsv.check_data(tmp_path, "MME", good, None) == tmp_path / "MME.tsv"


def test_data_root_prefers_data_dir_then_lmudata(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMUData", str(tmp_path / "env"))
    assert tsv.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert tsv.data_root(None) == tmp_path / "env"
    monkeypatch.delenv("LMUData")
    assert tsv.data_root(None) == Path.home() / "LMUData"


def test_shapes_export_round_trips(tmp_path: Path) -> None:
    import base64
    import io

    from PIL import Image

    from prunebench.data.shapes import build_shapes

    path = tsv.export_shapes(tmp_path, n=6, image_size=32)
    columns, rows = tsv.read_tsv(path)
    assert columns == ["index", "image", "question", "answer", "category"]
    for row, item in zip(rows, build_shapes(6, image_size=32), strict=True):
        assert (row["question"], row["answer"], row["category"]) == (item.question, item.answer, item.category)
        image = Image.open(io.BytesIO(base64.b64decode(row["image"])))
        assert image.convert("RGB").tobytes() == item.image.convert("RGB").tobytes()


# ------------------------------------------------------------- checks that stop a run before loading


def _cfg(dataset: str, tmp_path: Path, **extra) -> dict:
    import yaml

    from prunebench.cli import CONFIG_DIR

    d = yaml.safe_load((CONFIG_DIR / "dataset" / f"{dataset}.yaml").read_text())
    d.update(data_dir=str(tmp_path), **extra)
    return {"dataset": d, "limit": None, "results_dir": str(tmp_path / "results")}


def _no_backend(monkeypatch) -> None:
    from prunebench.bridge import run

    def refuse():
        raise AssertionError("VLMEvalKit or the model was reached before the data checks")

    monkeypatch.setattr(run, "vlmeval_api", refuse)


def test_missing_tsv_fails_before_the_model_loads(tmp_path: Path, monkeypatch) -> None:
    from prunebench.bridge.run import run_vlmeval

    _no_backend(monkeypatch)
    with pytest.raises(UserError, match=r"MME\.tsv is missing; download https://.*MME\.tsv"):
        run_vlmeval(_cfg("MME", tmp_path))


@pytest.mark.parametrize("name", ["MathVista_MINI", "MathVision_MINI", "MIA-Bench", "MMVet"])
def test_judge_datasets_stop_without_an_endpoint(name: str, tmp_path: Path, monkeypatch) -> None:
    from prunebench.bridge.run import prepare_data

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match="scored by an LLM judge.*dataset.judge.api_base"):
        prepare_data(_cfg(name, tmp_path))


def test_video_dataset_without_data_stops_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """The video sets are wired (tests/test_bridge_video.py); without their data they stop before loading."""
    from prunebench.bridge.run import run_vlmeval

    _no_backend(monkeypatch)
    with pytest.raises(UserError, match=r"Video-MME\.tsv is missing; download the HF dataset lmms-lab/Video-MME"):
        run_vlmeval(_cfg("Video-MME", tmp_path))


def test_mme_subset_too_small_for_its_scorer(tmp_path: Path) -> None:
    from prunebench.bridge.run import prepare_data

    rows = _rows()
    tsv.write_tsv(tmp_path / "MME.tsv", list(rows[0]), rows)
    with pytest.raises(UserError, match="limit >= 28"):
        prepare_data(_cfg("MME", tmp_path, md5=None, limit=10))
    data = prepare_data(_cfg("MME", tmp_path, md5=None, limit=40))
    assert data.name == "MME_pbsub40s0" and (tmp_path / "MME_pbsub40s0.tsv").is_file()


def test_every_vlmeval_yaml_states_a_valid_score_mapping() -> None:
    import yaml

    from prunebench.cli import CONFIG_DIR

    seen = 0
    for path in sorted((CONFIG_DIR / "dataset").glob("*.yaml")):
        d = yaml.safe_load(path.read_text())
        if d.get("kind") == "vlmeval" and d.get("scorer", "vlmeval") == "vlmeval":
            scores.check_mapping(d["score"])
            assert d["name"] == path.stem
            seen += 1
    assert seen >= 18


def test_without_vlmeval_the_run_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    from prunebench.bridge import isolate
    from prunebench.bridge.run import run_vlmeval

    if isolate.vlmeval_missing_reason() is None:
        pytest.skip("VLMEvalKit is installed here")
    rows = _rows()
    tsv.write_tsv(tmp_path / "POPE.tsv", list(rows[0]), rows)
    with pytest.raises(UserError, match="scripts/setup_vlmeval.sh"):
        run_vlmeval(_cfg("POPE", tmp_path, md5=None))


def test_session_without_index_never_serves_another_answer(tiny, tmp_path: Path) -> None:
    """Issue 15: the bridge's model used without `track_index` (as an evaluator's own entry point would) answers
    each message afresh; before, the first answer was served for every later image."""
    import json

    import torch

    from prunebench.bridge.model import Session
    from prunebench.data.shapes import make_sample
    from prunebench.methods import resolve_method
    from prunebench.models.loader import LoadedModel
    from prunebench.stages import install
    from prunebench.timing import Timer

    loaded = LoadedModel(name="tiny", model=tiny.model, processor=tiny.processor, seams=tiny.seams,
                         device=torch.device("cpu"), dtype=torch.float32, weights="pretrained", source="test",
                         untrained=True)
    timer, seen = Timer(loaded.device), []
    with install(tiny.seams, resolve_method("vanilla"), 1.0, timer=timer) as inst:
        session = Session(loaded, inst, timer, 0, 4, tmp_path / "p.jsonl", {}, warmup=0)
        real = session._reseed
        session._reseed = lambda index: seen.append(index) or real(index)
        for seed in (0, 1):
            item = make_sample(seed, image_size=tiny.image_side)
            item.image.save(tmp_path / f"{seed}.png")
            session.answer([{"type": "image", "value": str(tmp_path / f"{seed}.png")},
                            {"type": "text", "value": item.question}])
        session.index = 7  # a tracked index: kept for resume, and used once only
        session.answer([{"type": "text", "value": "hi"}, {"type": "image", "value": str(tmp_path / "0.png")}])
    assert session.generated == 3 and seen == [None, None, 7] and session.index is None
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert list(session.known) == ["7"] and [r["index"] for r in rows] == [None, None, 7]


def test_score_mapping_stays_a_list(tmp_path: Path) -> None:
    """Issue 15: the dataset's `score` mapping reaches the record as JSON lists, not an OmegaConf repr string."""
    import json

    from hydra import compose, initialize_config_dir

    from prunebench.bridge.run import prepare_data
    from prunebench.checks import CONFIG_DIR

    (tmp_path / "MME.tsv").write_text("index\tquestion\n0\tq\n")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=MME", f"dataset.data_dir={tmp_path}", "dataset.md5=null"])
    data = prepare_data(cfg)
    assert json.loads(json.dumps(data.score)) == {"sum": ["perception", "reasoning"], "max": 2800}


def test_vlmeval_missing_env_file_error_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 15: VLMEvalKit's `load_env` error line for a clone without `.env` is not printed on every run;
    other errors still are."""
    import logging

    from prunebench.bridge.isolate import without_env_file_error

    with caplog.at_level(logging.INFO), without_env_file_error():
        logging.error("Did not detect the .env file at /x/.env, failed to load. ")
        logging.getLogger("LOAD_ENV").error("Did not detect the .env file at /y/.env, failed to load. ")
        logging.error("something else")
    logging.error("Did not detect the .env file at /z/.env")  # outside: untouched
    assert [r.getMessage() for r in caplog.records] == ["something else", "Did not detect the .env file at /z/.env"]
