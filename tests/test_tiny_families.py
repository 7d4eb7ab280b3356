from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor
from transformers.utils import is_torchvision_available

from prunebench.families.processors import PilVideoProcessor, load_processor
from prunebench.fixtures import tiny_families as tf
from prunebench.fixtures.tiny import ARCH_DIR

SMALL = dict(
    vision_layers=2,
    vision_hidden=32,
    vision_heads=2,
    text_layers=2,
    text_hidden=64,
    text_heads=4,
    text_kv_heads=2,
)
BUILDERS = {
    "internvl": tf.build_tiny_internvl,
    "llava_next": tf.build_tiny_llava_next,
    "llava_onevision": tf.build_tiny_onevision,
}
FAMILIES = sorted(BUILDERS)
PROMPTS = {
    "internvl": tf.internvl_prompt,
    "llava_next": tf.llava_next_prompt,
    "llava_onevision": tf.onevision_prompt,
}
PLACEHOLDERS = {"internvl": tf.IMG_CONTEXT, "llava_next": tf.IMAGE, "llava_onevision": tf.IMAGE}


def _hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _image(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (200, 40, 40))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build(root / family, seed=0, **SMALL) for family, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def loaded(built: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    out = {}
    for family, path in built.items():
        model = tf.MODEL_CLASSES[family].from_pretrained(path).eval()
        out[family] = (model, load_processor(path))
    return out


def _inputs(processor, family: str, image: Image.Image, question: str = "What colour?") -> dict[str, Any]:
    return processor(images=image, text=PROMPTS[family](question), return_tensors="pt")


def _image_features(model, inputs: dict[str, Any]):
    extra = {k: inputs[k] for k in ("image_sizes",) if k in inputs}
    with torch.no_grad():
        return model.get_image_features(pixel_values=inputs["pixel_values"], **extra).pooler_output


def _n(inputs: dict[str, Any], token_id: int) -> int:
    return int((inputs["input_ids"] == token_id).sum())


# ------------------------------------------------------------------------------------------- building


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_files(built: dict[str, Path], family: str) -> None:
    names = {p.name for p in built[family].iterdir()}
    expected = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
    }
    assert expected | {"chat_template.jinja", "README.md"} <= names
    card = (built[family] / "README.md").read_text()
    assert "random" in card and "seed 0" in card and "noise" in card
    assert AutoConfig.from_pretrained(built[family]).model_type == family


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_bit_identical_other_seed_differs(
    built: dict[str, Path], family: str, tmp_path: Path
) -> None:
    ref = _hashes(built[family])
    assert _hashes(BUILDERS[family](tmp_path / "again", seed=0, **SMALL)) == ref
    other = _hashes(BUILDERS[family](tmp_path / "other", seed=1, **SMALL))
    assert other["model.safetensors"] != ref["model.safetensors"]
    assert other["tokenizer.json"] == ref["tokenizer.json"]  # the tokenizer does not depend on the seed


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tf.build_tiny_onevision(tmp_path / "rng", seed=7, **SMALL)
    assert torch.equal(torch.rand(3), expected)


def test_ensure_builds_once(tmp_path: Path) -> None:
    path = tf.ensure_tiny_internvl(tmp_path / "ckpt", **SMALL)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tf.ensure_tiny_internvl(path, **SMALL) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


# ---------------------------------------------------------------------------------- config and tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_config_token_ids(loaded: dict[str, tuple[Any, Any]], family: str) -> None:
    model, processor = loaded[family]
    cfg, tok = model.config, processor.tokenizer
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids(PLACEHOLDERS[family]) == processor.image_token_id
    assert tok.padding_side == "left"
    ids = tok("hi")["input_ids"]
    if family == "llava_next":
        assert ids[0] == tok.bos_token_id == cfg.text_config.bos_token_id
        assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")
    else:
        assert tok.bos_token_id is None and ids == tok("hi", add_special_tokens=False)["input_ids"]  # no BOS
        assert cfg.text_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids(tf.IM_END)
        assert cfg.text_config.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids(tf.ENDOFTEXT)
    silent = sorted(tok.added_tokens_decoder)
    assert torch.count_nonzero(model.lm_head.weight[silent]) == 0  # never generated


def test_internvl_named_tokens(loaded: dict[str, tuple[Any, Any]]) -> None:
    model, processor = loaded["internvl"]
    tok = processor.tokenizer
    names = (tok.start_image_token, tok.end_image_token, tok.context_image_token)
    assert names == ("<img>", "</img>", "<IMG_CONTEXT>")
    ids = [model.config.image_token_id, tok.start_image_token_id, tok.end_image_token_id]
    assert processor.image_token_ids == ids
    assert len(set(processor.image_token_ids)) == 3


def test_onevision_video_token(loaded: dict[str, tuple[Any, Any]]) -> None:
    model, processor = loaded["llava_onevision"]
    video = model.config.video_token_id
    assert video == processor.video_token_id == processor.tokenizer.convert_tokens_to_ids("<video>")
    assert video != model.config.image_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_module_paths(loaded: dict[str, tuple[Any, Any]], family: str) -> None:
    model, _ = loaded[family]
    inner = model.model
    if family == "internvl":
        encoder_layers = inner.vision_tower.encoder.layer
        assert inner.vision_tower.embeddings.cls_token.shape == (1, 1, SMALL["vision_hidden"])
        assert type(inner.multi_modal_projector.layer_norm).__name__ == "LayerNorm"
    else:
        encoder_layers = inner.vision_tower.encoder.layers  # 5.23: no .vision_model wrapper
        assert inner.image_newline.shape == (SMALL["text_hidden"],)
    assert len(encoder_layers) == SMALL["vision_layers"]
    assert len(inner.language_model.layers) == SMALL["text_layers"]
    projector = inner.multi_modal_projector
    assert hasattr(projector, "linear_1") and hasattr(projector, "linear_2")
    assert model.lm_head.out_features == model.config.text_config.vocab_size


# --------------------------------------------------------------------------- prompts and chat templates


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_the_prompt(loaded: dict[str, tuple[Any, Any]], family: str) -> None:
    _, processor = loaded[family]
    question = "What color is the background? Answer with one word."
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert processor.apply_chat_template(conv, add_generation_prompt=True) == PROMPTS[family](question)


def test_qwen_style_prompts() -> None:
    q = "Is the circle on the left or the right?"
    assert tf.internvl_prompt(q) == f"<|im_start|>user\n<IMG_CONTEXT>\n{q}<|im_end|>\n<|im_start|>assistant\n"
    assert tf.onevision_prompt(q) == f"<|im_start|>user\n<image>\n{q}<|im_end|>\n<|im_start|>assistant\n"
    assert (
        tf.onevision_prompt(q, video=True)
        == f"<|im_start|>user\n<video>\n{q}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tf.llava_next_prompt(q) == f"USER: <image>\n{q} ASSISTANT:"


def test_onevision_chat_template_video(loaded: dict[str, tuple[Any, Any]]) -> None:
    _, processor = loaded["llava_onevision"]
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
    ]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + tf.onevision_prompt("What happens?", video=True)
    )


# ------------------------------------------------------------------------ visual tokens vs features


@pytest.mark.parametrize(
    ("size", "tiles"),
    [((64, 64), 1), ((80, 80), 1), ((128, 64), 3), ((64, 128), 3), ((96, 96), 5)],
)
def test_internvl_tiles_and_tokens(
    loaded: dict[str, tuple[Any, Any]], size: tuple[int, int], tiles: int
) -> None:
    model, processor = loaded["internvl"]
    inputs = _inputs(processor, "internvl", _image(*size))
    assert inputs["pixel_values"].shape == (tiles, 3, 64, 64)  # tiles (+ thumbnail when > 1) stacked flat
    features = _image_features(model, inputs)
    assert features.shape == (tiles, 16, SMALL["text_hidden"])  # 8x8 patches -> pixel shuffle -> 4x4 per tile
    ids = inputs["input_ids"][0]
    start, end = processor.tokenizer.start_image_token_id, processor.tokenizer.end_image_token_id
    context = (ids == model.config.image_token_id).nonzero().flatten()
    assert len(context) == 16 * tiles == tf.visual_feature_count(features)
    assert int((ids == start).sum()) == int((ids == end).sum()) == 1  # one <img>...</img> span for all tiles
    assert ids[context[0] - 1] == start and ids[context[-1] + 1] == end
    assert torch.equal(context, torch.arange(context[0], context[0] + len(context)))


def test_internvl_vision_tower_has_cls(loaded: dict[str, tuple[Any, Any]]) -> None:
    model, processor = loaded["internvl"]
    inputs = _inputs(processor, "internvl", _image(64, 64))
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state
    assert hidden.shape[1] == 1 + (64 // 8) ** 2  # CLS + patches; the CLS is dropped before pixel shuffle


def test_internvl_video(loaded: dict[str, tuple[Any, Any]]) -> None:
    model, processor = loaded["internvl"]
    frames = [_image(64, 64), _image(64, 64), _image(64, 64)]
    inputs = processor(
        videos=frames, text=tf.internvl_prompt("What happens?", video=True), return_tensors="pt"
    )
    assert inputs["pixel_values"].shape == (3, 3, 64, 64)  # frames travel as tiles in pixel_values
    assert _n(inputs, model.config.image_token_id) == 3 * 16
    assert "Frame3: <img>" in processor.tokenizer.decode(inputs["input_ids"][0])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize(
    ("size", "crops", "rows", "tokens"),
    [((96, 96), 4, 12, 36 + 12 * 13), ((96, 48), 2, 6, 36 + 6 * 13), ((48, 96), 2, 12, 36 + 12 * 7)],
)
def test_llava_next_anyres_layout(
    loaded: dict[str, tuple[Any, Any]], size: tuple[int, int], crops: int, rows: int, tokens: int
) -> None:
    """PIL size (w, h). Base view 6x6 first (no newline), then the stitched crop grid row by row, each row of
    feature tokens followed by one ``image_newline``."""
    model, processor = loaded["llava_next"]
    inputs = _inputs(processor, "llava_next", _image(*size))
    assert inputs["pixel_values"].shape == (1, 1 + crops, 3, 48, 48)
    assert inputs["image_sizes"].tolist() == [[size[1], size[0]]]
    features = _image_features(model, inputs)
    assert isinstance(features, (list, tuple)) and len(features) == 1
    assert features[0].shape == (tokens, SMALL["text_hidden"])
    assert _n(inputs, model.config.image_token_id) == tokens
    newline = model.model.image_newline
    is_newline = torch.tensor([torch.equal(row, newline) for row in features[0]])
    row_len = (tokens - 36) // rows
    assert not is_newline[:36].any()
    assert torch.equal(is_newline[36:].nonzero().flatten(), row_len * torch.arange(1, rows + 1) - 1)


def test_llava_next_batch_two_images(loaded: dict[str, tuple[Any, Any]]) -> None:
    model, processor = loaded["llava_next"]
    prompts = [tf.llava_next_prompt("What colour?"), tf.llava_next_prompt("What shape is there?")]
    inputs = processor(
        images=[_image(96, 96), _image(96, 48)], text=prompts, padding=True, return_tensors="pt"
    )
    assert inputs["pixel_values"].shape == (2, 5, 3, 48, 48)  # padded to the most crops
    features = _image_features(model, inputs)
    assert [f.shape[0] for f in features] == [192, 114]
    assert (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist() == [192, 114]


@pytest.mark.parametrize(
    ("size", "tiles", "tokens"),
    [((96, 96), 5, 36 + 12 * 13), ((48, 48), 2, 36 + 6 * 7), ((288, 288), 37, 36 + 18 * 19)],
)
def test_onevision_anyres_max(
    loaded: dict[str, tuple[Any, Any]], size: tuple[int, int], tiles: int, tokens: int
) -> None:
    """288x288 -> 6x6 crops -> a 36x36 grid, more than 9 crops' worth: bilinearly downsized to 18x18."""
    model, processor = loaded["llava_onevision"]
    inputs = _inputs(processor, "llava_onevision", _image(*size))
    assert inputs["pixel_values"].shape == (1, tiles, 3, 48, 48)
    features = _image_features(model, inputs)
    assert [f.shape[0] for f in features] == [tokens] == [_n(inputs, model.config.image_token_id)]
    assert torch.equal(features[0][-1], model.model.image_newline)


def test_onevision_multi_image_prompt(loaded: dict[str, tuple[Any, Any]]) -> None:
    """Several images in one prompt: no crops, base view + one newline each."""
    model, processor = loaded["llava_onevision"]
    prompt = tf.qwen_style_prompt("Same colour?", "<image><image>")
    inputs = processor(images=[[_image(96, 96), _image(96, 48)]], text=prompt, return_tensors="pt")
    assert inputs["batch_num_images"].tolist() == [2]
    extra = {"image_sizes": inputs["image_sizes"], "batch_num_images": inputs["batch_num_images"]}
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"], **extra).pooler_output
    assert [f.shape[0] for f in features] == [37, 37] and _n(inputs, model.config.image_token_id) == 74
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_onevision_video_frames_list_or_array(loaded: dict[str, tuple[Any, Any]]) -> None:
    model, processor = loaded["llava_onevision"]
    frames = [Image.new("RGB", (64, 80), (40 * i, 90, 10)) for i in range(4)]
    prompt = tf.onevision_prompt("What happens?", video=True)
    from_list = processor(videos=frames, text=prompt, return_tensors="pt")
    from_array = processor(videos=np.stack([np.asarray(f) for f in frames]), text=prompt, return_tensors="pt")
    assert from_list["pixel_values_videos"].shape == (1, 4, 3, 48, 48)
    assert torch.equal(from_list["pixel_values_videos"], from_array["pixel_values_videos"])
    assert torch.equal(from_list["input_ids"], from_array["input_ids"])
    with torch.no_grad():
        output = model.get_video_features(pixel_values_videos=from_list["pixel_values_videos"])
    features = output.pooler_output
    assert features.shape == (1, 4 * 9 + 1, SMALL["text_hidden"])  # 6x6 -> 3x3 per frame, 1 newline per video
    assert torch.equal(features[0, -1], model.model.image_newline)
    assert _n(from_list, model.config.video_token_id) == 37
    assert _n(from_list, model.config.image_token_id) == 0
    with torch.no_grad():
        out = model.generate(**from_list, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == from_list["input_ids"].shape[1] + 3


def test_onevision_video_frame_sampling(loaded: dict[str, tuple[Any, Any]]) -> None:
    _, processor = loaded["llava_onevision"]
    video = np.zeros((10, 48, 48, 3), dtype=np.uint8)
    prompt = tf.onevision_prompt("What happens?", video=True)
    inputs = processor(videos=video, text=prompt, do_sample_frames=True, num_frames=4, return_tensors="pt")
    assert inputs["pixel_values_videos"].shape == (1, 4, 3, 48, 48)


# ------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_position_ids(loaded: dict[str, tuple[Any, Any]], family: str) -> None:
    """generate() hands the LM explicit 2-D position_ids: cumsum(attention_mask) - 1 over the (left-padded)
    prompt, then one more per step."""
    model, processor = loaded[family]
    prompts = [
        PROMPTS[family]("Colour?"),
        PROMPTS[family]("Is there a red circle in the image? Answer yes or no."),
    ]
    inputs = processor(
        images=[_image(64, 64), _image(64, 64)], text=prompts, padding=True, return_tensors="pt"
    )
    seen: list[torch.Tensor] = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    mask = inputs["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # left padding
    prefill = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    assert len(seen) == 3 and torch.equal(seen[0], prefill)
    lengths = mask.sum(-1, keepdim=True)
    assert torch.equal(seen[1], lengths) and torch.equal(seen[2], lengths + 1)
    new = out[:, inputs["input_ids"].shape[1] :]
    special = torch.tensor(sorted(processor.tokenizer.added_tokens_decoder))
    assert new.shape == (2, 3) and not torch.isin(new, special).any()  # silenced special tokens


# ---------------------------------------------------------------------------------- processor loading


@pytest.mark.skipif(is_torchvision_available(), reason="documents the torchvision-less behaviour")
@pytest.mark.parametrize("family", ["internvl", "llava_onevision"])
def test_auto_processor_needs_torchvision(built: dict[str, Path], family: str) -> None:
    with pytest.raises((ImportError, ValueError, OSError, AttributeError)):
        AutoProcessor.from_pretrained(built[family])
    processor = load_processor(built[family])
    native = {"internvl": "InternVLProcessor", "llava_onevision": "LlavaOnevisionProcessor"}[family]
    assert type(processor).__name__ == native
    assert isinstance(processor.video_processor, PilVideoProcessor)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_processor_uses_native_names(built: dict[str, Path], family: str) -> None:
    saved = json.loads((built[family] / "processor_config.json").read_text())
    native = {
        "internvl": "InternVLProcessor",
        "llava_next": "LlavaNextProcessor",
        "llava_onevision": "LlavaOnevisionProcessor",
    }
    assert saved["processor_class"] == native[family]
    assert not saved["image_processor"]["image_processor_type"].endswith("Pil")
    if family != "llava_next":  # e.g. LlavaOnevisionVideoProcessor, loadable where torchvision exists
        video_type = native[family].replace("Processor", "VideoProcessor")
        assert saved["video_processor"]["video_processor_type"] == video_type


def test_llava_next_auto_processor(built: dict[str, Path]) -> None:
    processor = AutoProcessor.from_pretrained(built["llava_next"])
    assert type(processor).__name__ == "LlavaNextProcessor" and processor.tokenizer.padding_side == "left"
    assert processor.tokenizer.model_max_length == 4096


# ------------------------------------------------------------------------------ reference configs (meta)

PUBLIC_SIZES = {  # parameters, from the model cards
    "internvl3-1b": 0.94e9,
    "internvl3-8b": 7.9e9,
    "llava-v1.6-vicuna-7b": 7.06e9,
    "llava-onevision-qwen2-7b-ov": 8.03e9,
    "llava-video-7b-qwen2": 8.03e9,
}


@pytest.mark.parametrize("name", sorted(PUBLIC_SIZES))
def test_reference_config_parameter_count(name: str) -> None:
    config = tf.family_reference_config(name)
    with torch.device("meta"):
        model = tf.MODEL_CLASSES[config.model_type](config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PUBLIC_SIZES[name]) / PUBLIC_SIZES[name] < 0.05, f"{name}: {count / 1e9:.3f}B"


@pytest.mark.parametrize("name", sorted(tf.FAMILY_REFERENCE))
def test_shipped_arch_files_are_current(name: str) -> None:
    """``arch/<name>.json`` equals :func:`family_reference_config` and loads as the loader loads it."""
    text = (ARCH_DIR / f"{name}.json").read_text()
    assert text == tf.family_reference_config(name).to_json_string()
    config = AutoConfig.for_model(**json.loads(text))
    assert config.to_json_string() == text


def test_reference_geometry() -> None:
    internvl = tf.family_reference_config("internvl3-8b")
    assert internvl.image_seq_length == 256 and list(internvl.vision_config.image_size) == [448, 448]
    next_ = tf.family_reference_config("llava-v1.6-vicuna-7b")
    assert next_.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    ov = tf.family_reference_config("llava-onevision-qwen2-7b-ov")
    assert len(ov.image_grid_pinpoints) == 36 and ov.vision_config.num_hidden_layers == 26
    assert (ov.image_token_id, ov.video_token_id) == (151646, 151647)


@pytest.mark.parametrize(
    ("name", "attr", "value"),
    [("internvl3-1b", "image_seq_length", 256), ("llava-v1.6-vicuna-7b", "patch_size", 14),
     ("llava-onevision-qwen2-7b-ov", "num_image_tokens", 729)],
)  # fmt: skip
def test_family_local_processor(name: str, attr: str, value: int) -> None:
    config = tf.family_reference_config(name)
    processor, fields = tf.family_local_processor(config)
    assert getattr(processor, attr) == value
    assert fields["image_token_id"] == processor.image_token_id
    assert all(0 <= v < len(processor.tokenizer) <= config.text_config.vocab_size for v in fields.values())
