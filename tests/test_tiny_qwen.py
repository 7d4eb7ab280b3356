from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from prunebench.data.shapes import all_answers, all_questions
from prunebench.families.processors import (
    Qwen2_5_VLImageTextProcessor,
    Qwen2VLImageTextProcessor,
    load_qwen_processor,
)
from prunebench.fixtures.tiny_qwen import (
    ARCH_DIR,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN_REFERENCE,
    QWEN_SPECIAL_TOKENS,
    build_qwen_tokenizer,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    ensure_tiny_qwen2_5_vl,
    mrope_section,
    qwen_local_processor,
    qwen_pixel_bounds,
    qwen_reference_config,
    qwen_vl_prompt,
)

BUILDERS = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "qwen2_vl": build_tiny_qwen2_vl}
MODEL_CLASSES = {
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}
PROCESSORS = {"qwen2_5_vl": Qwen2_5_VLImageTextProcessor, "qwen2_vl": Qwen2VLImageTextProcessor}
NATIVE = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor"}
QUESTION = "What color is the square? Answer with one word."


def _hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _conv(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def ckpt(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return BUILDERS[kind](tmp_path_factory.mktemp(kind) / "ckpt", seed=0)


@pytest.fixture(scope="module")
def processor(ckpt: Path):
    return load_qwen_processor(ckpt)


@pytest.fixture(scope="module")
def model(kind: str, ckpt: Path):
    return MODEL_CLASSES[kind].from_pretrained(ckpt).eval()


# ------------------------------------------------------------------------------------- checkpoint


def test_checkpoint_files(kind: str, ckpt: Path) -> None:
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "processor_config.json", "chat_template.jinja", "README.md"} <= names  # fmt: skip
    card = (ckpt / "README.md").read_text()
    assert "untrained random" in card and "seed 0" in card and "noise" in card
    proc_cfg = json.loads((ckpt / "processor_config.json").read_text())
    assert proc_cfg["processor_class"] == NATIVE[kind]  # a standard checkpoint layout, minus video
    assert proc_cfg["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    assert "video_processor" not in proc_cfg
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["processor_class"] == NATIVE[kind]


def test_same_seed_bit_identical(kind: str, ckpt: Path, tmp_path: Path) -> None:
    assert _hashes(BUILDERS[kind](tmp_path / "again", seed=0)) == _hashes(ckpt)


def test_different_seed_differs(kind: str, ckpt: Path, tmp_path: Path) -> None:
    other, ref = _hashes(BUILDERS[kind](tmp_path / "other", seed=1)), _hashes(ckpt)
    assert other["model.safetensors"] != ref["model.safetensors"]
    assert other["tokenizer.json"] == ref["tokenizer.json"]


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_qwen2_vl(tmp_path / "rng", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple"):
        build_tiny_qwen2_5_vl(tmp_path / "a", image_size=100)
    with pytest.raises(ValueError, match="out_hidden"):
        build_tiny_qwen2_vl(tmp_path / "b", out_hidden=32)


def test_ensure_builds_once(tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny_qwen"
    assert ensure_tiny_qwen2_5_vl(target) == target
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    ensure_tiny_qwen2_5_vl(target)
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in target.parent.iterdir()] == ["tiny_qwen"]  # no temp dirs left behind
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ensure_tiny_qwen2_5_vl(tmp_path / "x")


# ---------------------------------------------------------------------------------- config, model


def test_config_matches_tokenizer(kind: str, model, processor) -> None:
    cfg, tok = model.config, processor.tokenizer
    assert cfg.model_type == kind and not cfg.tie_word_embeddings
    assert cfg.text_config.vocab_size == len(tok)
    assert (cfg.image_token_id, cfg.video_token_id) == (tok.image_token_id, tok.video_token_id)
    assert (processor.image_token_id, processor.video_token_id) == (cfg.image_token_id, cfg.video_token_id)
    ids = tok.convert_tokens_to_ids
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (
        ids("<|vision_start|>"),
        ids("<|vision_end|>"),
    )
    text = cfg.text_config
    assert (text.eos_token_id, text.pad_token_id) == (ids("<|im_end|>"), ids("<|endoftext|>")) == (
        tok.eos_token_id, tok.pad_token_id)  # fmt: skip
    assert model.generation_config.eos_token_id == [ids("<|im_end|>"), ids("<|endoftext|>")]
    head_dim = text.hidden_size // text.num_attention_heads
    assert (
        text.rope_parameters["mrope_section"] == [2, 3, 3] and sum(mrope_section(head_dim)) == head_dim // 2
    )
    vision = cfg.vision_config
    assert (vision.spatial_merge_size, vision.temporal_patch_size, vision.patch_size) == (2, 2, 14)
    assert model.config._attn_implementation == "sdpa"


def test_module_structure(kind: str, model) -> None:
    visual, lm = model.model.visual, model.model.language_model
    assert len(visual.blocks) == 4 and hasattr(visual.merger, "ln_q") and hasattr(visual, "rotary_pos_emb")
    assert (
        len(lm.layers) == 4
        and hasattr(lm, "rotary_emb")
        and model.lm_head.out_features == len(lm.embed_tokens.weight)
    )
    if kind == "qwen2_5_vl":
        assert visual.fullatt_block_indexes == [1, 3] and visual.window_size == 56
    else:
        assert not hasattr(visual, "fullatt_block_indexes")


def test_mrope_section() -> None:
    assert mrope_section(128) == [16, 24, 24] and mrope_section(16) == [2, 3, 3]
    assert all(sum(mrope_section(d)) == d // 2 for d in (16, 32, 64, 128))


# ------------------------------------------------------------------------------ processor, prompt


def test_prompt_rendering(processor) -> None:
    rendered = processor.apply_chat_template(_conv(QUESTION), add_generation_prompt=True, tokenize=False)
    assert (
        rendered
        == qwen_vl_prompt(QUESTION)
        == (
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
            f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
        )
    )
    assert processor.chat_template == QWEN2_VL_CHAT_TEMPLATE
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(conv, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


@pytest.mark.parametrize(
    ("width", "height", "grid"), [(112, 112, (1, 8, 8)), (112, 56, (1, 4, 8)), (56, 112, (1, 8, 4))]
)
def test_image_tokens_match_grid(
    processor, model, width: int, height: int, grid: tuple[int, int, int]
) -> None:
    prompt = processor.apply_chat_template(_conv(QUESTION), add_generation_prompt=True, tokenize=False)
    inputs = processor(
        images=Image.new("RGB", (width, height), (30, 70, 220)), text=prompt, return_tensors="pt"
    )
    assert set(inputs) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
    }
    assert tuple(inputs["image_grid_thw"][0].tolist()) == grid
    n_patches = grid[0] * grid[1] * grid[2]
    assert tuple(inputs["pixel_values"].shape) == (n_patches, 3 * 2 * 14 * 14)
    is_image = inputs["input_ids"] == model.config.image_token_id
    assert int(is_image.sum()) == n_patches // 4
    assert torch.equal(inputs["mm_token_type_ids"], is_image.long())  # 1 on <|image_pad|> only
    assert inputs["input_ids"][0, 0] == processor.tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS


def test_pixel_bounds(processor) -> None:
    assert qwen_pixel_bounds() == {"shortest_edge": 256 * 28 * 28, "longest_edge": 1280 * 28 * 28}
    assert (processor.image_processor.size.shortest_edge, processor.image_processor.size.longest_edge) == (
        56 * 56, 224 * 224)  # fmt: skip
    for side, lo, hi in [(1000, 256, 1280), (112, 256, 1280), (2000, 256, 1280)]:
        image = Image.new("RGB", (side, side * 3 // 4))
        grid = processor.image_processor(image, size=qwen_pixel_bounds(), return_tensors="pt")[
            "image_grid_thw"
        ]
        assert lo <= int(grid.prod()) // 4 <= hi
    with pytest.raises(ValueError):
        qwen_pixel_bounds(10, 5)


def test_tokenizer() -> None:
    tok = build_qwen_tokenizer()
    for text in all_answers() + all_questions():
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.bos_token is None and tok.encode("red") == tok.encode("red", add_special_tokens=False)
    assert tok.image_token == "<|image_pad|>" and tok.video_token == "<|video_pad|>"
    assert tok.encode("<|vision_start|><|image_pad|><|vision_end|>") == [
        tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    ]


def test_load_processor_from_hub_layout(tmp_path: Path) -> None:
    """A real checkpoint's layout: preprocessor_config.json with min/max_pixels, chat_template.json."""
    qwen_reference_config("qwen2.5-vl-7b").save_pretrained(tmp_path)
    build_qwen_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }))  # fmt: skip
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}))
    bounds = qwen_pixel_bounds()
    processor = load_qwen_processor(
        tmp_path, min_pixels=bounds["shortest_edge"], max_pixels=bounds["longest_edge"]
    )
    assert isinstance(processor, Qwen2_5_VLImageTextProcessor)
    assert processor.image_processor.size.longest_edge == 1280 * 28 * 28
    assert processor.apply_chat_template(
        _conv("q"), add_generation_prompt=True, tokenize=False
    ) == qwen_vl_prompt("q")


def test_local_processor_for_random_weights() -> None:
    config = qwen_reference_config("qwen2-vl-7b")
    processor, overrides = qwen_local_processor(config)
    assert isinstance(processor, Qwen2VLImageTextProcessor)
    assert overrides["image_token_id"] == processor.image_token_id < config.text_config.vocab_size
    assert set(overrides) == {
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
    }
    grid = processor(images=Image.new("RGB", (64, 64)), text=qwen_vl_prompt("q"), return_tensors="pt")[
        "image_grid_thw"
    ]
    assert int(grid.prod()) // 4 >= 256  # upscaled to UniPruneBench's minimum


# --------------------------------------------------------------------------------------- running


def test_forward_and_generate(processor, model) -> None:
    inputs = processor(images=Image.new("RGB", (112, 56)), text=qwen_vl_prompt(QUESTION), return_tensors="pt")
    seen: list[tuple] = []

    def hook(module, args, kwargs) -> None:
        seen.append(tuple(kwargs["position_ids"].shape))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    finally:
        handle.remove()
    length = inputs["input_ids"].shape[1]
    assert logits.shape == (1, length, model.config.text_config.vocab_size)
    assert out.shape == (1, length + 3)
    # plain forward: 3-D M-RoPE ids; generate: text positions prepended (4 rows), then one token per step
    assert seen == [(3, 1, length), (4, 1, length), (4, 1, 1), (4, 1, 1)]
    assert isinstance(processor.batch_decode(out[:, length:], skip_special_tokens=True)[0], str)


def test_special_tokens_never_generated(processor, model) -> None:
    special = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)))
    assert not model.lm_head.weight[special].any()  # zero rows: logit exactly 0, below the random max
    inputs = processor(images=Image.new("RGB", (56, 112)), text=qwen_vl_prompt(QUESTION), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert new.numel() == 8 and not torch.isin(new, special).any()  # no early <|im_end|>, no <|image_pad|>


# -------------------------------------------------------------------------- real-size configs (meta)


@pytest.mark.parametrize(
    ("name", "layers", "hidden", "vocab", "params_b", "tie"),
    [
        ("qwen2.5-vl-3b", 36, 2048, 151936, 3.75, True),
        ("qwen2.5-vl-7b", 28, 3584, 152064, 8.29, False),
        ("qwen2-vl-7b", 28, 3584, 152064, 8.29, False),
    ],
)
def test_reference_configs(
    name: str, layers: int, hidden: int, vocab: int, params_b: float, tie: bool
) -> None:
    path = ARCH_DIR / f"{name}.json"
    raw = json.loads(path.read_text())
    fresh = json.loads(qwen_reference_config(name).to_json_string())
    assert {k: v for k, v in raw.items() if k != "transformers_version"} == {
        k: v for k, v in fresh.items() if k != "transformers_version"
    }
    cfg = AutoConfig.from_pretrained(path)
    text, vision = cfg.text_config, cfg.vision_config
    assert cfg.model_type == QWEN_REFERENCE[name][0] and cfg.tie_word_embeddings is tie
    assert (text.num_hidden_layers, text.hidden_size, text.vocab_size) == (layers, hidden, vocab)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id) == (151655, 151656, 151652)
    assert (vision.depth, vision.num_heads, vision.patch_size, vision.spatial_merge_size) == (32, 16, 14, 2)
    if cfg.model_type == "qwen2_5_vl":
        assert (vision.hidden_size, vision.out_hidden_size, vision.window_size) == (1280, hidden, 112)
        assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31]
    else:
        assert (vision.embed_dim, vision.hidden_size) == (1280, hidden)
    with torch.device("meta"):
        big = MODEL_CLASSES[cfg.model_type](cfg)
    n = sum(p.numel() for p in big.parameters()) / 1e9
    assert abs(n - params_b) / params_b < 0.03
    assert len(big.model.language_model.layers) == layers
