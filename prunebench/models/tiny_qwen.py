"""Tiny, randomly initialised Qwen2.5-VL / Qwen2-VL checkpoints built offline, and real-size reference configs.

The checkpoints use the HF-native classes (``Qwen2_5_VLForConditionalGeneration``,
``Qwen2VLForConditionalGeneration``) with the real module structure (Conv3d patch embed, 2-D rotary ViT,
window attention + full-attention blocks for 2.5-VL, 2x2 patch merger, Qwen2 decoder with 3-D M-RoPE)
but tiny sizes and untrained weights. Same arguments give byte-identical files.

Notes on transformers 5.23 without torchvision:
- ``Qwen2_5_VLProcessor`` / ``Qwen2VLProcessor`` take a video processor, and every video processor class
  (``VideoProcessorMixin`` included) needs torchvision. Without it the native processors cannot be built at
  all, and ``AutoProcessor.from_pretrained`` fails on any Qwen2(.5)-VL checkpoint (ours raise ``OSError:
  Can't load video processor``). :class:`Qwen2_5_VLImageTextProcessor` / :class:`Qwen2VLImageTextProcessor`
  are the native processors minus the video processor; they save themselves under the native class name,
  so the checkpoint layout is that of a real one minus video. Load with :func:`load_qwen_processor`
  (works for real checkpoints too).
- The image processor is ``Qwen2VLImageProcessorPil`` (saved as ``Qwen2VLImageProcessor`` inside
  ``processor_config.json``; ``AutoImageProcessor`` picks the PIL backend when torchvision is missing).
  Pixel bounds are ``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}`` in 5.23 terms.
- The tokenizer is the byte-level BPE of :func:`prunebench.models.tiny.build_tokenizer` with LLaVA's added
  tokens and BOS post-processor removed (ids 0-2, ``<unk> <s> </s>``, stay as unused vocab entries) and the
  Qwen special tokens appended in Qwen order. Like Qwen: no BOS, eos ``<|im_end|>``, pad ``<|endoftext|>``.
- The chat template is Qwen2-VL's without the default system prompt (Qwen's template inserts
  "You are a helpful assistant." when the first message is not a system message; ours does not).
- The processor returns ``mm_token_type_ids`` (int64 [B, L]: 1 on ``<|image_pad|>``, 2 on ``<|video_pad|>``,
  0 elsewhere, vision start/end included). The models need it with ``image_grid_thw`` to build 3-D M-RoPE
  positions. Without it a Qwen2-VL forward raises, a Qwen2.5-VL forward silently uses 1-D positions, and
  ``generate`` silently uses 1-D positions for both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen2VLTextConfig,
    Qwen2VLVisionConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from prunebench.models.tiny import ARCH_DIR, _save, build_tokenizer, ensure_built, write_configs

# The Qwen2-VL added tokens, in Qwen's id order (151643 ... 151656 in the real vocabulary).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
ENDOFTEXT, IM_END = "<|endoftext|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}
MERGE_SIZE = 2  # spatial_merge_size: 2x2 ViT patches -> one LLM token
TEMPORAL_PATCH_SIZE = 2

# Qwen2-VL's chat template (Qwen2.5-VL uses the same), minus the default system prompt.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_vl_prompt(question: str) -> str:
    """The Qwen2(.5)-VL single-image prompt (no system prompt) for ``question``."""
    return (
        f"<|im_start|>user\n{VISION_START}{IMAGE_PAD}{VISION_END}{question}{IM_END}\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------------------------------ tokenizer


def build_qwen_tokenizer(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """The tiny-LLaVA BPE (trained on ``corpus``, default the shapes templates) with Qwen's special tokens
    instead of LLaVA's (no BOS, eos ``<|im_end|>``)."""
    spec = json.loads(build_tokenizer(corpus).backend_tokenizer.to_str())
    spec["added_tokens"], spec["post_processor"] = [], None  # drop <unk>/<s>/</s>/<image>/<pad> handling
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens={  # named: the processors read tokenizer.image_token / .video_token
            "image_token": IMAGE_PAD,
            "video_token": VIDEO_PAD,
            "vision_bos_token": VISION_START,
            "vision_eos_token": VISION_END,
        },
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


# ------------------------------------------------------------------------------------------ processor


class _ImageTextOnly:
    """Mixin: a Qwen-VL processor without the video processor, saved under the native class name.

    The native name in ``processor_config.json`` keeps the checkpoint a standard one; with a private name
    ``AutoProcessor`` would silently fall back to returning the bare tokenizer.
    """

    native_class: type

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        # ProcessorMixin zips positional sub-processors with get_attributes() ([image_processor, tokenizer]
        # here, read off this signature), so the ``None`` video processor is dropped.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = self.native_class.__name__
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        tok_cfg = Path(save_directory) / "tokenizer_config.json"
        if tok_cfg.is_file():  # ProcessorMixin stamps the tokenizer config with type(self).__name__
            data = json.loads(tok_cfg.read_text(encoding="utf-8"))
            data["processor_class"] = self.native_class.__name__
            tok_cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return files


class Qwen2_5_VLImageTextProcessor(_ImageTextOnly, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images and text only: works without torchvision."""

    native_class = Qwen2_5_VLProcessor


class Qwen2VLImageTextProcessor(_ImageTextOnly, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text only: works without torchvision."""

    native_class = Qwen2VLProcessor


_PROCESSORS = {"qwen2_5_vl": Qwen2_5_VLImageTextProcessor, "qwen2_vl": Qwen2VLImageTextProcessor}


def load_qwen_processor(path: str | Path, **kwargs: Any) -> _ImageTextOnly:
    """Load the (image+text) processor of a Qwen2-VL / Qwen2.5-VL checkpoint, tiny or real, without torchvision."""
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in _PROCESSORS:
        raise ValueError(f"{path} is a '{model_type}' checkpoint, not one of {sorted(_PROCESSORS)}")
    return _PROCESSORS[model_type].from_pretrained(path, **kwargs)


def qwen_pixel_bounds(min_tokens: int = 256, max_tokens: int = 1280, *, factor: int = 28) -> dict[str, int]:
    """Pixel bounds for ``min_tokens``..``max_tokens`` LLM visual tokens per image, as a 5.23 ``size`` dict.

    ``factor`` is ``patch_size * merge_size`` (28 for the real models). The defaults are UniPruneBench's
    (appendix B): ``min_pixels = 256*28*28``, ``max_pixels = 1280*28*28``; ``shortest_edge`` is min_pixels
    and ``longest_edge`` is max_pixels. Use at call time, ``processor(images=..., text=..., size=...)`` (5.23
    warns on call-time ``min_pixels``/``max_pixels``), or in ``Qwen2VLImageProcessorPil(size=...)``. When
    *loading*, pass ``min_pixels=``/``max_pixels=`` instead: a hub ``preprocessor_config.json`` stores the
    legacy ``min_pixels``/``max_pixels`` keys, which override a ``size=`` load kwarg.
    """
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    return {"shortest_edge": min_tokens * factor * factor, "longest_edge": max_tokens * factor * factor}


def build_qwen_image_processor(patch_size: int, min_tokens: int, max_tokens: int) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL preprocessing (smart resize to multiples of 2*patch, CLIP mean/std, patchify), PIL backend."""
    return Qwen2VLImageProcessorPil(
        size=qwen_pixel_bounds(min_tokens, max_tokens, factor=patch_size * MERGE_SIZE),
        patch_size=patch_size,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def build_qwen_processor(
    model_type: str,
    *,
    patch_size: int = 14,
    min_tokens: int = 4,
    max_tokens: int = 64,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> _ImageTextOnly:
    """A locally built image+text processor for ``model_type`` ``qwen2_5_vl`` or ``qwen2_vl``."""
    return _PROCESSORS[model_type](
        image_processor=build_qwen_image_processor(patch_size, min_tokens, max_tokens),
        tokenizer=tokenizer if tokenizer is not None else build_qwen_tokenizer(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def qwen_local_processor(
    config: PretrainedConfig, min_tokens: int = 256, max_tokens: int = 1280
) -> tuple[_ImageTextOnly, dict[str, int]]:
    """For random weights on a real-size config: a local processor (UniPruneBench pixel bounds by default)
    and the config fields (vision token ids) to overwrite so they match its tokenizer."""
    processor = build_qwen_processor(
        config.model_type,
        patch_size=config.vision_config.patch_size,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
    )
    return processor, _token_ids(processor.tokenizer)


# --------------------------------------------------------------------------------- config and model


def mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the ``head_dim // 2`` rotary frequencies, Qwen's 1/4, 3/8, 3/8."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _text_kwargs(
    *,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    max_pos: int,
    window_layers: int | None = None,
) -> dict[str, Any]:
    """Qwen2 decoder settings (sliding window off, M-RoPE with theta 1e6) as text-config kwargs."""
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
        hidden_act="silu", rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=window_layers or layers,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section(hidden // heads)},
    )  # fmt: skip


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids(IMAGE_PAD), video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START), vision_end_token_id=ids(VISION_END),
    )  # fmt: skip


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return dict(bos_token_id=eot, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_qwen2_5_vl_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    patch_size: int, vision_depth: int, vision_hidden: int, vision_heads: int, out_hidden: int,
    window_size: int, fullatt_block_indexes: tuple[int, ...], text_layers: int, text_hidden: int,
    text_heads: int, text_kv_heads: int, intermediate_mult: int,
) -> Qwen2_5_VLConfig:  # fmt: skip
    """A ``Qwen2_5_VLConfig`` with the real structure and the given (small) sizes."""
    vision = Qwen2_5_VLVisionConfig(
        depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * intermediate_mult,
        num_heads=vision_heads, patch_size=patch_size, spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE, window_size=window_size, out_hidden_size=out_hidden,
        fullatt_block_indexes=list(fullatt_block_indexes), tokens_per_second=2, hidden_act="silu",
    )  # fmt: skip
    text = Qwen2_5_VLTextConfig(
        **_text_kwargs(
            vocab=len(tokenizer), hidden=text_hidden, layers=text_layers, heads=text_heads,
            kv_heads=text_kv_heads, intermediate=text_hidden * intermediate_mult, max_pos=4096,
        ),
        **_special_ids(tokenizer),
    )  # fmt: skip
    return Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, tie_word_embeddings=False, **_token_ids(tokenizer),
        architectures=["Qwen2_5_VLForConditionalGeneration"], dtype="float32",
    )  # fmt: skip


def build_qwen2_vl_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    patch_size: int, vision_depth: int, vision_hidden: int, vision_heads: int, out_hidden: int,
    text_layers: int, text_hidden: int, text_heads: int, text_kv_heads: int, intermediate_mult: int,
) -> Qwen2VLConfig:  # fmt: skip
    """A ``Qwen2VLConfig`` (no window attention; vision ``embed_dim`` is the ViT width, ``hidden_size`` the
    merger output)."""
    vision = Qwen2VLVisionConfig(
        depth=vision_depth, embed_dim=vision_hidden, hidden_size=out_hidden, mlp_ratio=intermediate_mult,
        num_heads=vision_heads, patch_size=patch_size, spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE, hidden_act="quick_gelu",
    )  # fmt: skip
    text = Qwen2VLTextConfig(
        **_text_kwargs(
            vocab=len(tokenizer), hidden=text_hidden, layers=text_layers, heads=text_heads,
            kv_heads=text_kv_heads, intermediate=text_hidden * intermediate_mult, max_pos=4096,
        ),
        **_special_ids(tokenizer),
    )  # fmt: skip
    return Qwen2VLConfig(
        vision_config=vision, text_config=text, tie_word_embeddings=False, **_token_ids(tokenizer),
        architectures=["Qwen2VLForConditionalGeneration"], dtype="float32",
    )  # fmt: skip


def build_qwen_model(
    model_class: type[PreTrainedModel],
    config: PretrainedConfig,
    seed: int,
    silent_ids: list[int] | None = None,
) -> PreTrainedModel:
    """Randomly initialised model (sdpa); the global torch RNG is seeded and restored afterwards.

    The ``lm_head`` rows of ``silent_ids`` are zeroed: their logit is exactly 0 while the max of the other
    (random, zero-mean) logits is positive, so greedy decoding never emits them. Used for the special tokens,
    so a random model never generates an ``<|image_pad|>`` (which would break re-feeding its output: one
    placeholder more than image features) nor an early ``<|im_end|>`` (generation always runs to length).
    """
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.eval()
    if silent_ids:
        with torch.no_grad():
            model.lm_head.weight[silent_ids] = 0.0
    text, gen = config.text_config, model.generation_config
    gen.bos_token_id, gen.pad_token_id = text.bos_token_id, text.pad_token_id
    gen.eos_token_id = [text.eos_token_id, text.bos_token_id]  # <|im_end|>, <|endoftext|> as in Qwen
    return model


# ------------------------------------------------------------------------- full-size reference configs

_VISION_25 = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
    hidden_act="silu", in_channels=3,
)  # fmt: skip
_VISION_2 = dict(
    depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, hidden_act="quick_gelu", in_channels=3,
)  # fmt: skip
# name -> (model_type, text sizes, max_position_embeddings, tie_word_embeddings); from the hub config.json files.
QWEN_REFERENCE: dict[str, tuple[str, dict[str, int], int, bool]] = {
    "qwen2.5-vl-3b": ("qwen2_5_vl", dict(vocab=151936, hidden=2048, layers=36, heads=16, kv_heads=2,
                                          intermediate=11008, window_layers=70), 128000, True),
    "qwen2.5-vl-7b": ("qwen2_5_vl", dict(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
                                          intermediate=18944, window_layers=28), 128000, False),
    "qwen2-vl-7b": ("qwen2_vl", dict(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
                                      intermediate=18944, window_layers=28), 32768, False),
}  # fmt: skip
_REAL_IDS = dict(bos_token_id=151643, eos_token_id=151645)
_REAL_VISION_IDS = dict(
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653
)


def qwen_reference_config(name: str) -> PretrainedConfig:
    """The config of ``Qwen/Qwen2.5-VL-3B-Instruct`` (``qwen2.5-vl-3b``), ``...-7B-Instruct`` (``qwen2.5-vl-7b``)
    or ``Qwen/Qwen2-VL-7B-Instruct`` (``qwen2-vl-7b``)."""
    if name not in QWEN_REFERENCE:
        raise KeyError(f"unknown Qwen reference config '{name}'; known: {sorted(QWEN_REFERENCE)}")
    model_type, sizes, max_pos, tie = QWEN_REFERENCE[name]
    text = dict(**_text_kwargs(**sizes, max_pos=max_pos), **_REAL_IDS, dtype="bfloat16")
    common = dict(tie_word_embeddings=tie, dtype="bfloat16", **_REAL_VISION_IDS)
    if model_type == "qwen2_5_vl":
        return Qwen2_5_VLConfig(
            vision_config=Qwen2_5_VLVisionConfig(**_VISION_25, out_hidden_size=sizes["hidden"]),
            text_config=Qwen2_5_VLTextConfig(**text), architectures=["Qwen2_5_VLForConditionalGeneration"],
            **common,
        )  # fmt: skip
    return Qwen2VLConfig(
        vision_config=Qwen2VLVisionConfig(**_VISION_2, hidden_size=sizes["hidden"]),
        text_config=Qwen2VLTextConfig(**text), architectures=["Qwen2VLForConditionalGeneration"], **common,
    )  # fmt: skip


def write_qwen_reference_configs(arch_dir: str | Path = ARCH_DIR) -> list[Path]:
    """(Re)write ``arch/{qwen2.5-vl-3b,qwen2.5-vl-7b,qwen2-vl-7b}.json`` from :func:`qwen_reference_config`."""
    return write_configs({name: (lambda n=name: qwen_reference_config(n)) for name in QWEN_REFERENCE}, arch_dir)


# ---------------------------------------------------------------------------------------- saving


def _model_card(kind: str, seed: int, sizes: dict[str, Any], num_params: int) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sizes.items())
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [prunebench, {kind}, random-weights, testing]
---
# prunebench tiny-{kind} (random weights)

Built locally by `prunebench.models.tiny_qwen` — nothing was downloaded.

**The weights are untrained random initialisation (seed {seed}). Any accuracy measured with this
model is noise.** It exists to exercise Qwen-VL pipelines (`{MODEL_CLASSES[kind].__name__}`, dynamic-resolution
images, 3-D M-RoPE) and visual-token pruning on CPU.

- parameters: {num_params:,}
- the `lm_head` rows of the Qwen special tokens are zero, so greedy decoding never emits them
  (no `<|image_pad|>` in generated text, no early `<|im_end|>`: generation runs to `max_new_tokens`)
- tokenizer: byte-level BPE trained on the prunebench shapes-dataset templates + Qwen special tokens
- image processor: `Qwen2VLImageProcessorPil` (no torchvision needed); no video processor
- processor: load with `prunebench.models.tiny_qwen.load_qwen_processor(path)` (image + text only);
  `AutoProcessor` needs torchvision for the video processor and fails without one
- chat template: Qwen2-VL's, without a default system prompt

| setting | value |
|---|---|
| seed | {seed} |
{rows}
"""


def verify_tiny_qwen(path: str | Path, image_size: int = 112) -> None:
    """Load ``path`` back; check processor outputs, image-token expansion, a forward pass and ``generate``."""
    from PIL import Image

    path = Path(path)
    processor = load_qwen_processor(path)
    config = AutoConfig.from_pretrained(path)
    model = MODEL_CLASSES[config.model_type].from_pretrained(path).eval()
    image = Image.new("RGB", (image_size, image_size), (128, 64, 32))
    inputs = processor(
        images=image, text=qwen_vl_prompt("What color is the background?"), return_tensors="pt"
    )
    missing = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"} - set(
        inputs
    )
    if missing:
        raise RuntimeError(f"processor output lacks {sorted(missing)}")
    got = int((inputs["input_ids"] == config.image_token_id).sum())
    expected = int(inputs["image_grid_thw"].prod(-1).sum()) // MERGE_SIZE**2
    if got != expected:
        raise RuntimeError(f"processor expanded the image into {got} tokens, expected {expected}")
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    if logits.shape != (1, inputs["input_ids"].shape[1], config.text_config.vocab_size):
        raise RuntimeError(f"unexpected logits shape {tuple(logits.shape)}")
    if out.shape[1] <= inputs["input_ids"].shape[1]:
        raise RuntimeError("generate produced no tokens")


def _build(
    kind: str,
    path: str | Path,
    seed: int,
    image_size: int,
    sizes: dict[str, Any],
    processor_kw: dict[str, int],
) -> Path:
    """Build the ``kind`` checkpoint with the model ``sizes`` at ``path``, save it, verify it."""
    patch_size = sizes["patch_size"]
    if image_size % (patch_size * MERGE_SIZE):
        raise ValueError(f"image_size {image_size} must be a multiple of 2*patch_size {2 * patch_size}")
    if sizes["out_hidden"] != sizes["text_hidden"]:
        raise ValueError(f"out_hidden {sizes['out_hidden']} must equal text_hidden {sizes['text_hidden']}")
    path = Path(path)
    tokenizer = build_qwen_tokenizer()
    build_config = {"qwen2_5_vl": build_qwen2_5_vl_config, "qwen2_vl": build_qwen2_vl_config}[kind]
    silent = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    model = build_qwen_model(MODEL_CLASSES[kind], build_config(tokenizer, **sizes), seed, silent)
    processor = build_qwen_processor(kind, patch_size=patch_size, tokenizer=tokenizer, **processor_kw)
    num_params = sum(p.numel() for p in model.parameters())
    card = _model_card(kind, seed, dict(image_size=image_size, **sizes, **processor_kw), num_params)
    _save(path, model, processor, card)
    verify_tiny_qwen(path, image_size)
    return path


def build_tiny_qwen2_5_vl(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 112,
    patch_size: int = 14,
    vision_depth: int = 4,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    out_hidden: int = 64,
    window_size: int = 56,
    fullatt_block_indexes: tuple[int, ...] = (1, 3),
    text_layers: int = 4,
    text_hidden: int = 64,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    intermediate_mult: int = 4,
    min_tokens: int = 4,
    max_tokens: int = 64,
) -> Path:
    """Build, save and verify a tiny Qwen2.5-VL at ``path``.

    ``image_size`` is the side of the square image used to verify the checkpoint (112 -> 8x8 patches ->
    16 LLM tokens, 4 attention windows of ``window_size`` 56 px). The processor resizes every image to
    between ``min_tokens`` and ``max_tokens`` LLM visual tokens (defaults: 56x56 .. 224x224 pixels).
    ``out_hidden`` must equal ``text_hidden`` (the merger feeds the LLM).
    """
    sizes = dict(
        patch_size=patch_size, vision_depth=vision_depth, vision_hidden=vision_hidden, vision_heads=vision_heads,
        out_hidden=out_hidden, window_size=window_size, fullatt_block_indexes=tuple(fullatt_block_indexes),
        text_layers=text_layers, text_hidden=text_hidden, text_heads=text_heads, text_kv_heads=text_kv_heads,
        intermediate_mult=intermediate_mult,
    )  # fmt: skip
    return _build(
        "qwen2_5_vl", path, seed, image_size, sizes, dict(min_tokens=min_tokens, max_tokens=max_tokens)
    )


def build_tiny_qwen2_vl(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 112,
    patch_size: int = 14,
    vision_depth: int = 4,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    out_hidden: int = 64,
    text_layers: int = 4,
    text_hidden: int = 64,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    intermediate_mult: int = 4,
    min_tokens: int = 4,
    max_tokens: int = 64,
) -> Path:
    """Build, save and verify a tiny Qwen2-VL (full attention in every ViT block) at ``path``.

    Arguments as in :func:`build_tiny_qwen2_5_vl`, without the window-attention ones.
    """
    sizes = dict(
        patch_size=patch_size, vision_depth=vision_depth, vision_hidden=vision_hidden, vision_heads=vision_heads,
        out_hidden=out_hidden, text_layers=text_layers, text_hidden=text_hidden, text_heads=text_heads,
        text_kv_heads=text_kv_heads, intermediate_mult=intermediate_mult,
    )  # fmt: skip
    return _build(
        "qwen2_vl", path, seed, image_size, sizes, dict(min_tokens=min_tokens, max_tokens=max_tokens)
    )


def ensure_tiny_qwen2_5_vl(path: str | Path, **kwargs: Any) -> Path:
    """Build the tiny Qwen2.5-VL at ``path`` unless ``path/config.json`` exists (atomic)."""
    return ensure_built(path, build_tiny_qwen2_5_vl, **kwargs)


def ensure_tiny_qwen2_vl(path: str | Path, **kwargs: Any) -> Path:
    """Build the tiny Qwen2-VL at ``path`` unless ``path/config.json`` exists (atomic)."""
    return ensure_built(path, build_tiny_qwen2_vl, **kwargs)
