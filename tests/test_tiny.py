from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from prunebench.data.shapes import all_answers, all_questions, build_shapes
from prunebench.fixtures.tiny import (
    ARCH_DIR,
    build_tiny_llava,
    ensure_tiny_llava,
    llava15_prompt,
    llava15_reference_config,
)

SMALL = dict(image_size=48, patch_size=8, vision_layers=4, vision_hidden=32, text_layers=2, text_hidden=64)
N_IMAGE_TOKENS = (48 // 8) ** 2


def _hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0, **SMALL)


@pytest.fixture(scope="module")
def processor(tiny: Path):
    return AutoProcessor.from_pretrained(tiny)


@pytest.fixture(scope="module")
def model(tiny: Path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(tiny).eval()


def test_checkpoint_files(tiny: Path) -> None:
    names = {p.name for p in tiny.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "README.md",
    } <= names
    card = (tiny / "README.md").read_text()
    assert "random" in card and "seed 0" in card and "noise" in card


def test_same_seed_bit_identical(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_llava(tmp_path / "again", seed=0, **SMALL)
    assert _hashes(again) == _hashes(tiny)


def test_different_seed_differs(tiny: Path, tmp_path: Path) -> None:
    other = _hashes(build_tiny_llava(tmp_path / "other", seed=1, **SMALL))
    ref = _hashes(tiny)
    assert other["model.safetensors"] != ref["model.safetensors"]
    assert other["tokenizer.json"] == ref["tokenizer.json"]  # the tokenizer does not depend on the seed


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_llava(tmp_path / "rng", seed=7, **SMALL)
    assert torch.equal(torch.rand(3), expected)


def test_config(model: LlavaForConditionalGeneration, processor) -> None:
    cfg = model.config
    tok = processor.tokenizer
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.text_config.num_hidden_layers == 2 and cfg.vision_config.num_hidden_layers == 4
    assert (cfg.text_config.bos_token_id, cfg.text_config.eos_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert cfg.text_config.pad_token_id == tok.pad_token_id == cfg.pad_token_id
    assert not cfg.tie_word_embeddings


def test_prompt_renders_llava15(processor) -> None:
    q = "What color is the square? Answer with one word."
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    rendered = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert rendered == f"USER: <image>\n{q} ASSISTANT:" == llava15_prompt(q)


def test_processor_expands_image_tokens(processor, model) -> None:
    sample = build_shapes(1, image_size=96)[0]  # the processor resizes 96 -> 48
    inputs = processor(images=sample.image, text=llava15_prompt(sample.question), return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 48, 48)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == N_IMAGE_TOKENS
    assert int(inputs["input_ids"][0, 0]) == processor.tokenizer.bos_token_id


def test_tokenizer_roundtrips_dataset(processor) -> None:
    tok = processor.tokenizer
    for text in all_answers() + all_questions():
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True).strip() == text
    for answer in all_answers():  # as generated after "ASSISTANT:"
        assert tok.decode(tok.encode(" " + answer, add_special_tokens=False)).strip() == answer
    assert 300 <= len(tok) <= 1000


def test_generate_runs(processor, model) -> None:
    sample = build_shapes(1, image_size=48)[0]
    inputs = processor(images=sample.image, text=llava15_prompt(sample.question), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape[0] == 1 and prompt_len < out.shape[1] <= prompt_len + 3
    assert isinstance(processor.batch_decode(out, skip_special_tokens=True)[0], str)


def test_ensure_builds_once(tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    assert ensure_tiny_llava(target, **SMALL) == target
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    ensure_tiny_llava(target, **SMALL)
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]  # no temp dirs left behind


def test_ensure_refuses_foreign_dir(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ensure_tiny_llava(tmp_path / "x", **SMALL)


def test_bad_patch_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_tiny_llava(tmp_path / "bad", image_size=50, patch_size=8)


@pytest.mark.parametrize(
    ("variant", "layers", "hidden", "params_b"), [("7b", 32, 4096, 7.06), ("13b", 40, 5120, 13.35)]
)
def test_reference_configs(variant: str, layers: int, hidden: int, params_b: float) -> None:
    path = ARCH_DIR / f"llava-1.5-{variant}.json"
    raw = json.loads(path.read_text())
    assert raw["model_type"] == "llava"
    fresh = json.loads(llava15_reference_config(variant).to_json_string())
    assert {k: v for k, v in raw.items() if k != "transformers_version"} == {
        k: v for k, v in fresh.items() if k != "transformers_version"
    }
    for cfg in (LlavaConfig(**raw), LlavaConfig.from_pretrained(path)):
        vis, text = cfg.vision_config, cfg.text_config
        assert (vis.image_size // vis.patch_size) ** 2 == 576 == cfg.image_seq_length
        assert (text.num_hidden_layers, text.hidden_size, text.vocab_size) == (layers, hidden, 32064)
        assert (cfg.image_token_id, cfg.pad_token_id, vis.hidden_act) == (32000, 32001, "quick_gelu")
        assert cfg.vision_feature_layer == -2 and cfg.dtype == torch.float16
    with torch.device("meta"):
        big = LlavaForConditionalGeneration(LlavaConfig(**raw))
    assert round(sum(p.numel() for p in big.parameters()) / 1e9, 2) == params_b
