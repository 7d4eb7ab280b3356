"""The bridge's checks before the model loads and its hold on VLMEvalKit's files: pure, no VLMEvalKit.

`FakeImageDataset` transcribes the parts of VLMEvalKit's `ImageBaseDataset` the fixes are about
(`vlmeval/dataset/image_base.py`): `img_root = <LMUData>/images/<img_root_map(name)>` set in
`__init__`, `prepare_tsv` (an MD5 not equal to `DATASET_MD5[name]` -> `download_file(url, path)`
over the local file), `dump_image` (a readable file already at `<img_root>/<index>.png` is reused).
"""

from __future__ import annotations

import base64
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from prunebench.bridge import guard, run, tsv
from prunebench.cli import CONFIG_DIR
from prunebench.errors import UserError

FAKE_MODULE = "vlmeval.pbfake"  # where the fake's download_file lives (the bridge patches vlmeval.* modules)


def _png(value: int) -> str:
    from PIL import Image

    return tsv.encode_png(Image.new("RGB", (8, 8), (value, 0, 0)))


class FakeImageDataset:
    DATASET_URL: dict[str, str] = {}
    DATASET_MD5: dict[str, str] = {}

    def __init__(self, dataset: str) -> None:
        import os

        root = os.environ["LMUData"]
        self.dataset_name = dataset
        self.img_root = str(Path(root) / "images" / dataset)
        path = Path(root) / f"{dataset}.tsv"
        want = self.DATASET_MD5.get(dataset)
        if want is not None and tsv.file_md5(path) != want:  # prepare_tsv: "md5 does not match, will re-download"
            sys.modules[FAKE_MODULE].download_file(self.DATASET_URL[dataset], str(path))
        _, self.rows = tsv.read_tsv(path)
        self.meta_only = "image" not in self.rows[0]

    @classmethod
    def supported_datasets(cls) -> list[str]:
        return list(cls.DATASET_URL)

    def dump_image(self, row: dict[str, str]) -> str:
        path = Path(self.img_root) / f"{row['index']}.png"
        if not path.is_file():  # read_ok: an existing image is reused, whatever TSV it came from
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(row["image"]))
        return str(path)

    def evaluate(self, eval_file: str, **judge_kwargs: object) -> dict[str, float]:
        return {"Overall": 1.0}


class FakeYORN(FakeImageDataset):
    DATASET_URL = {"MME": "https://opencompass.openxlab.space/utils/VLMEval/MME.tsv",
                   "POPE": "https://opencompass.openxlab.space/utils/VLMEval/POPE.tsv"}
    DATASET_MD5 = {"MME": "b36b43c3f09801f5d368627fb92187c3", "POPE": "0" * 32}


class FakeCustomVQA(FakeImageDataset):
    """VLMEvalKit's CustomVQADataset: what build_dataset guesses for a name it does not know."""

    @classmethod
    def supported_datasets(cls) -> list[str]:
        return []

    def evaluate(self, eval_file: str, **judge_kwargs: object) -> dict[str, float]:
        raise NotImplementedError


class BaseNoop(FakeImageDataset):
    """ImageBaseDataset's own evaluate: a no-op."""

    DATASET_URL = {"NoScore": "x"}

    def evaluate(self, eval_file, **judge_kwargs):
        pass


@pytest.fixture
def fake_api(monkeypatch):
    downloads: list[tuple[str, str]] = []

    def download_file(url: str, filename: str | None = None) -> str:  # what VLMEvalKit's does, offline-safe
        downloads.append((url, str(filename)))
        Path(str(filename)).write_text("index\tquestion\n0\tdownloaded\n")
        return str(filename)

    module = types.ModuleType(FAKE_MODULE)
    module.download_file = download_file  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, FAKE_MODULE, module)
    monkeypatch.setattr(FakeYORN, "DATASET_URL", dict(FakeYORN.DATASET_URL))
    monkeypatch.setattr(FakeYORN, "DATASET_MD5", dict(FakeYORN.DATASET_MD5))
    classes = [FakeYORN, BaseNoop]

    def build_dataset(name: str):
        owner = next((c for c in classes if name in c.supported_datasets()), None)
        return (owner or FakeCustomVQA)(dataset=name)

    return SimpleNamespace(dataset_classes=classes, build_dataset=build_dataset, downloads=downloads)


def _write(root: Path, name: str, value: int, n: int = 4) -> Path:
    rows = [{"index": str(i), "image": _png(value + i), "question": f"q{i}", "answer": "Yes", "category": "color"}
            for i in range(n)]
    return tsv.write_tsv(root / f"{name}.tsv", list(rows[0]), rows)


def _cfg(dataset: str, root: Path, **extra) -> dict:
    d = yaml.safe_load((CONFIG_DIR / "dataset" / f"{dataset}.yaml").read_text())
    d.update(data_dir=str(root), **extra)
    return {"dataset": d, "limit": None, "results_dir": str(root / "results")}


def _build(api, cfg):
    data = run.prepare_data(cfg)
    with run._lmudata(data.root):
        return data, run.build_vlmeval_dataset(api, data)


# ------------------------------------------------------------------ 1. decoded images of another TSV


def test_a_replaced_tsv_never_reuses_the_old_decoded_images(fake_api, tmp_path: Path) -> None:
    root = tmp_path / "LMUData"
    _write(root, "MME", value=10)
    cfg = _cfg("MME", root, md5=None)
    _, first = _build(fake_api, cfg)
    old = [Path(first.dump_image(r)).read_bytes() for r in first.rows]
    _write(root, "MME", value=200)  # the user replaces the TSV in the same data folder
    _, second = _build(fake_api, cfg)
    new = [Path(second.dump_image(r)).read_bytes() for r in second.rows]
    assert new == [base64.b64decode(r["image"]) for r in second.rows]  # every image from the new TSV
    assert all(a != b for a, b in zip(old, new, strict=True))
    assert second.img_root != first.img_root
    md5 = tsv.file_md5(root / "MME.tsv")
    assert guard.read_marker(Path(second.img_root)) == md5 and Path(second.img_root).name == f"MME.{md5[:12]}"
    _, third = _build(fake_api, cfg)  # the same content reuses its own folder
    assert third.img_root == second.img_root


def test_a_replaced_tsv_under_a_subset_name_gets_its_own_images(fake_api, tmp_path: Path) -> None:
    root = tmp_path / "LMUData"
    _write(root, "POPE", value=10, n=8)
    cfg = _cfg("POPE", root, md5=None, limit=4)
    data, first = _build(fake_api, cfg)
    assert data.name == "POPE_pbsub4s0"
    old = {r["index"]: Path(first.dump_image(r)).read_bytes() for r in first.rows}
    _write(root, "POPE", value=100, n=8)
    _, second = _build(fake_api, cfg)
    for r in second.rows:
        got = Path(second.dump_image(r)).read_bytes()
        assert got == base64.b64decode(r["image"]) and got != old[r["index"]]


def test_image_path_only_tsv_keeps_vlmevalkit_folder(fake_api, tmp_path: Path) -> None:
    """A TSV without base64 images names the user's own files relative to VLMEvalKit's folder."""
    root = tmp_path / "LMUData"
    rows = [{"index": "0", "image_path": "a.jpg", "question": "q", "answer": "Yes", "category": "c"}]
    tsv.write_tsv(root / "MME.tsv", list(rows[0]), rows)
    _, ds = _build(fake_api, _cfg("MME", root, md5=None))
    assert ds.img_root == str(root / "images" / "MME")


def test_a_localized_big_tsv_from_another_content_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(guard, "LOCALIZE_BYTES", 10)
    root = tmp_path
    path = _write(root, "MME", value=1)
    (root / "images" / "MME").mkdir(parents=True)
    (root / "images" / "MME" / "0.jpg").write_bytes(b"old")
    with pytest.raises(UserError, match=r"images/MME holds images VLMEvalKit decoded from another MME\.tsv"):
        guard.check_localized(root, "MME", path, tsv.file_md5(path))
    (root / "images" / "MME" / "0.jpg").unlink()
    with guard.image_cache(root, "MME", path, tsv.file_md5(path)):
        import os

        assert os.environ.get("FORCE_LOCAL") == "1"  # VLMEvalKit re-localizes instead of reusing _local.tsv
    assert guard.read_marker(root / "images" / "MME") == tsv.file_md5(path)


# ------------------------------------------------------------------- 2. no download over a user's file


def test_md5_null_on_a_vlmevalkit_name_never_downloads_over_the_users_file(fake_api, tmp_path: Path) -> None:
    root = tmp_path / "LMUData"
    path = _write(root, "MME", value=10)
    before = path.read_bytes()
    data, ds = _build(fake_api, _cfg("MME", root, md5=None))  # dataset=MME dataset.md5=null
    assert fake_api.downloads == [] and path.read_bytes() == before
    assert len(ds.rows) == 4 and data.name == "MME"
    assert FakeYORN.DATASET_MD5["MME"] == tsv.file_md5(path)  # VLMEvalKit's own check accepts the file


def test_a_download_onto_an_existing_file_is_refused(fake_api, tmp_path: Path) -> None:
    target = tmp_path / "MME.tsv"
    target.write_text("mine")
    with guard.no_download(run._vlmeval_modules()):
        with pytest.raises(UserError, match="about to download .* over .*MME.tsv"):
            sys.modules[FAKE_MODULE].download_file("https://x/MME.tsv", str(target))
        sys.modules[FAKE_MODULE].download_file("https://x/new.tsv", str(tmp_path / "new.tsv"))  # a new file: fine
    assert target.read_text() == "mine" and not hasattr(sys.modules[FAKE_MODULE].download_file, "__wrapped__")


# --------------------------------------------------------------- 3. the scorer, before the model loads


def _no_model(monkeypatch) -> None:
    from prunebench.models import loader

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the scorer check")

    monkeypatch.setattr(loader, "load_model", refuse)


def test_custom_name_without_base_stops_before_the_model_loads(fake_api, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "LMUData"
    _write(root, "MyMME_local", value=10)
    monkeypatch.setattr(run, "vlmeval_api", lambda: fake_api)
    _no_model(monkeypatch)
    cfg = _cfg("MME", root, md5=None, name="MyMME_local")  # dataset=MME dataset.name=MyMME_local
    with pytest.raises(UserError, match=r"MyMME_local is not a dataset VLMEvalKit knows.*set \+dataset\.base=MME"):
        run.run_vlmeval(cfg, quiet=True)
    with pytest.raises(UserError, match=r"dataset\.base=NoSuch is not a dataset VLMEvalKit knows"):
        run.run_vlmeval(_cfg("MME", root, md5=None, name="MyMME_local", base="NoSuch"), quiet=True)


def test_check_scorer_routes_custom_names_to_their_base(fake_api) -> None:
    d = {"name": "MyMME_local", "url": None}
    assert guard.check_scorer(fake_api, d, "MyMME_local", "MME") is FakeYORN
    assert guard.check_scorer(fake_api, {"name": "MME"}, "MME", None) is FakeYORN
    with pytest.raises(UserError, match=r"\+dataset\.base=MME"):  # the closest VLMEvalKit name
        guard.check_scorer(fake_api, d, "MyMME_local", None)
    with pytest.raises(UserError, match="BaseNoop .* has no evaluate"):
        guard.check_scorer(fake_api, {"name": "NoScore"}, "NoScore", None)


def test_has_scorer_reads_not_implemented_and_noop_bodies() -> None:
    assert guard.has_scorer(FakeYORN) and not guard.has_scorer(FakeCustomVQA) and not guard.has_scorer(BaseNoop)


# --------------------------------------------------------------------------- typed dataset parameters


@pytest.mark.parametrize("key,value,match", [
    ("limit", 1.5, r"dataset\.limit must be an integer >= 1 or null, got 1\.5"),
    ("limit", "abc", r"dataset\.limit must be an integer >= 1 or null, got 'abc'"),
    ("limit", 0, r"dataset\.limit must be an integer >= 1"),
    ("limit", True, r"dataset\.limit must be an integer"),
    ("subset_seed", 1.5, r"dataset\.subset_seed must be an integer, got 1\.5"),
    ("subset_seed", None, r"dataset\.subset_seed must be an integer, got None"),
    ("max_new_tokens", 0, r"dataset\.max_new_tokens must be an integer >= 1"),
    ("md5", "abc", r"dataset\.md5 must be a 32-hex-digit MD5 string or null, got 'abc'"),
    ("md5", 5, r"dataset\.md5 must be a 32-hex-digit MD5 string or null"),
    ("min_limit", 2.0, r"dataset\.min_limit must be an integer >= 1 or null"),
    ("url", 3, r"dataset\.url must be a string or null"),
    ("stratify", 1, r"dataset\.stratify must be a column name or null"),
    ("limt", 5, r"unknown option dataset\.limt \(did you mean 'limit'\?\)"),
])
def test_bad_dataset_values_are_one_line_before_anything(key, value, match, tmp_path: Path, monkeypatch) -> None:
    _no_backend(monkeypatch)
    cfg = _cfg("MME", tmp_path)  # no MME.tsv: the typed check comes first
    cfg["dataset"][key] = value
    with pytest.raises(UserError, match=match):
        run.run_vlmeval(cfg, quiet=True)


@pytest.mark.parametrize("key,value,match", [
    ("nframe", 2.5, r"dataset\.nframe must be an integer >= 1"),
    ("nframe", "8", r"dataset\.nframe must be an integer"),
    ("fps", "x", r"dataset\.fps must be a number > 0"),
    ("fps", 0, r"dataset\.fps must be a number > 0"),
    ("video_llm", "yes", r"dataset\.video_llm must be true or false"),
    ("modality", "audio", r"dataset\.modality must be one of image, video"),
])
def test_bad_video_values_are_one_line(key, value, match, tmp_path: Path, monkeypatch) -> None:
    _no_backend(monkeypatch)
    cfg = _cfg("Video-MME", tmp_path)
    cfg["dataset"][key] = value
    with pytest.raises(UserError, match=match):
        run.run_vlmeval(cfg, quiet=True)


def test_bad_export_args_and_top_level_limit(tmp_path: Path, monkeypatch) -> None:
    _no_backend(monkeypatch)
    cfg = _cfg("shapes_vlmeval", tmp_path)
    cfg["dataset"]["export_args"] = {"n": 2.5, "seed": 0, "image_size": 32}
    with pytest.raises(UserError, match=r"dataset\.export_args\.n must be an integer >= 1, got 2\.5"):
        run.run_vlmeval(cfg, quiet=True)
    cfg = _cfg("MME", tmp_path, md5=None)
    _write(tmp_path, "MME", value=1)
    cfg["limit"] = 1.5  # was truncated to 1
    with pytest.raises(UserError, match=r"^limit must be an integer >= 1 or null, got 1\.5$"):
        run.prepare_data(cfg)


def test_every_shipped_vlmeval_yaml_passes_the_typed_checks() -> None:
    seen = 0
    for path in sorted((CONFIG_DIR / "dataset").glob("*.yaml")):
        d = yaml.safe_load(path.read_text())
        if d.get("kind") == "vlmeval":
            guard.check_vlmeval_config(d)
            guard.check_vlmeval_config({**d, "base": d["name"], "limit": 5, "subset_seed": 3})
            seen += 1
    assert seen >= 20


def test_omegaconf_values_pass_the_typed_checks() -> None:
    from omegaconf import OmegaConf

    d = yaml.safe_load((CONFIG_DIR / "dataset" / "probe_vlmeval.yaml").read_text())
    d["export_args"]["families"] = ["count"]
    guard.check_vlmeval_config(OmegaConf.create(d))


def _no_backend(monkeypatch) -> None:
    def refuse():
        raise AssertionError("VLMEvalKit or the model was reached before the checks")

    monkeypatch.setattr(run, "vlmeval_api", refuse)


def test_a_job_folder_answered_on_another_tsv_is_not_resumed(tmp_path: Path) -> None:
    root, out = tmp_path / "LMUData", tmp_path / "job"
    _write(root, "MME", value=10)
    data = run.prepare_data(_cfg("MME", root, md5=None))
    run.check_job_data(out, data)  # fresh: the folder records its TSV
    assert guard.read_marker(out / "vlmeval") == data.tsv_md5
    (out / "predictions.jsonl").write_text('{"index": "0"}\n')
    run.check_job_data(out, data)  # same content: resumes
    _write(root, "MME", value=200)
    with pytest.raises(UserError, match=r"job folder .*job holds answers on another MME\.tsv .*another results_dir"):
        run.check_job_data(out, run.prepare_data(_cfg("MME", root, md5=None)))
