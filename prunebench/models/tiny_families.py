"""Tiny, randomly initialised InternVL3 / LLaVA-NeXT / LLaVA-OneVision checkpoints built offline, and
real-size reference configs for ``weights=random``.

The checkpoints use the HF-native classes and module structure (no remote code) with tiny sizes and untrained
weights; the same arguments give byte-identical files.

- **InternVL3** (``InternVLForConditionalGeneration``): InternViT (CLS token + absolute position embeddings,
  layer scale), CLS dropped (``vision_feature_select_strategy="default"``), 2x2 pixel shuffle
  (``downsample_ratio=0.5``), LayerNorm + MLP projector, Qwen2 decoder. Images are cut into tiles (GOT-OCR2
  dynamic tiling, plus a thumbnail when there is more than one tile); each tile gives
  ``(image_size / patch_size)**2 / 4`` tokens. A prompt carries one ``<IMG_CONTEXT>`` per image, which the
  processor expands into ``<img>`` + N x ``<IMG_CONTEXT>`` + ``</img>``.
- **LLaVA-NeXT** (``LlavaNextForConditionalGeneration``): CLIP tower, any-resolution crops over
  ``image_grid_pinpoints`` (base view first, then the crop grid with its padding removed and one
  ``image_newline`` after every feature row), Llama decoder, LLaVA-1.5 prompt.
- **LLaVA-OneVision** (``LlavaOnevisionForConditionalGeneration``): SigLIP tower (no CLS), anyres-max-9
  packing for images, 2x2 bilinear pooling per video frame plus one newline per video, Qwen2 decoder.

Notes on transformers 5.23 without torchvision:
- Every video processor class needs torchvision (``BaseVideoProcessor``, ``AutoVideoProcessor`` are dummies),
  and ``ProcessorMixin`` type-checks a video processor against ``transformers.VideoProcessorMixin``, which is
  exported only with torchvision. So ``InternVLProcessor`` and ``LlavaOnevisionProcessor`` cannot even be
  constructed (not even with ``video_processor=None``), and ``AutoProcessor.from_pretrained`` fails on every
  InternVL / OneVision checkpoint. :class:`PilVideoProcessor` is a PIL/NumPy video processor (decoded frames:
  a list of PIL images or a ``[T, H, W, 3]`` array) saved under the native class name, so these checkpoints
  load natively where torchvision exists; :func:`load_processor` loads tiny or real checkpoints of the three
  families with or without it. ``LlavaNextProcessor`` has no video processor: ``AutoProcessor`` works.
- Tokenizers reuse the project BPE (:func:`prunebench.models.tiny.build_tokenizer`): LLaVA-NeXT as is (``<s>``
  BOS, ``<image>``, ``<pad>``, like ``llava-v1.6-vicuna``); InternVL3 / OneVision the Qwen variant
  (:func:`prunebench.models.tiny_qwen.build_qwen_tokenizer`: no BOS, eos ``<|im_end|>``) plus their tokens.
- The ``lm_head`` rows of all added (special) tokens are zero, so greedy decoding never emits a placeholder or
  an early eos (as in the tiny Qwen-VL checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2Config,
    SiglipVisionConfig,
    processing_utils,
)
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import (
    VideoMetadata,
    default_sample_indices_fn,
    is_valid_video,
    make_batched_metadata,
    make_batched_videos,
)

from prunebench.models.tiny import (
    ARCH_DIR,
    LLAVA_15_CHAT_TEMPLATE,
    _save,
    build_tokenizer,
    ensure_built,
    llava15_prompt,
    write_configs,
)
from prunebench.models.tiny_qwen import (
    ENDOFTEXT,
    IM_END,
    build_qwen_model,
    build_qwen_tokenizer,
)

IM_START = "<|im_start|>"
IMAGE, VIDEO = "<image>", "<video>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# InternVL3-hf's tokens after Qwen2.5's (ids 151665.. in the real vocab), then the processor's video marker.
INTERNVL_ADDED_TOKENS = (
    IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", VIDEO,
)  # fmt: skip
INTERNVL_NAMED_TOKENS = {
    "start_image_token": IMG_START,
    "end_image_token": IMG_END,
    "context_image_token": IMG_CONTEXT,
    "video_token": VIDEO,
}
ONEVISION_ADDED_TOKENS = (IMAGE, VIDEO)  # ids 151646, 151647 in the real vocab
ONEVISION_NAMED_TOKENS = {"image_token": IMAGE, "video_token": VIDEO}
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "internvl": InternVLForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}


# ------------------------------------------------------------------------------------ chat templates


def qwen_chat_template(image_placeholder: str, video_placeholder: str = VIDEO) -> str:
    """InternVL3-hf's chat template with the given placeholders: ``<|im_start|>{role}\\n``, the content items
    in order (image/video: placeholder + ``\\n``; text as is), ``<|im_end|>\\n``; no default system prompt."""
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' %}{{ '" + image_placeholder + "\\n' }}"
        "{% elif content['type'] == 'video' %}{{ '" + video_placeholder + "\\n' }}"
        "{% elif content['type'] == 'text' %}{{ content['text'] }}"
        "{% endif %}{% endfor %}{% endif %}"
        "{{ '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


INTERNVL_CHAT_TEMPLATE = qwen_chat_template(IMG_CONTEXT)
ONEVISION_CHAT_TEMPLATE = qwen_chat_template(IMAGE)


def qwen_style_prompt(question: str, placeholder: str) -> str:
    """``<|im_start|>user\\n{placeholder}\\n{question}<|im_end|>\\n<|im_start|>assistant\\n``."""
    return f"{IM_START}user\n{placeholder}\n{question}{IM_END}\n{IM_START}assistant\n"


def internvl_prompt(question: str, *, video: bool = False) -> str:
    """The InternVL3 prompt for one image (``<IMG_CONTEXT>``) or one video (``<video>``)."""
    return qwen_style_prompt(question, VIDEO if video else IMG_CONTEXT)


def onevision_prompt(question: str, *, video: bool = False) -> str:
    """The LLaVA-OneVision prompt for one image (``<image>``) or one video (``<video>``)."""
    return qwen_style_prompt(question, VIDEO if video else IMAGE)


def llava_next_prompt(question: str) -> str:
    """The LLaVA-NeXT (vicuna) prompt, LLaVA-1.5's: ``USER: <image>\\n{question} ASSISTANT:``."""
    return llava15_prompt(question)


# ------------------------------------------------------------------------------------------ tokenizers


def build_family_tokenizer(
    added: Sequence[str], named: dict[str, str], corpus: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """The Qwen-style project BPE (no BOS, eos ``<|im_end|>``, pad ``<|endoftext|>``, left padding; trained on
    ``corpus``, default the shapes templates) plus the ``added`` special tokens (appended in order) and
    ``named`` ones (``tokenizer.<name>``/``.<name>_id``)."""
    backend = build_qwen_tokenizer(corpus).backend_tokenizer
    backend.add_special_tokens(list(added))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=dict(named),
        padding_side="left",  # batched generation
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def build_internvl_tokenizer(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """With ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<quad>``/``<ref>``/``<box>`` pairs and ``<video>``."""
    return build_family_tokenizer(INTERNVL_ADDED_TOKENS, INTERNVL_NAMED_TOKENS, corpus)


def build_onevision_tokenizer() -> PreTrainedTokenizerFast:
    """With ``<image>`` and ``<video>``."""
    return build_family_tokenizer(ONEVISION_ADDED_TOKENS, ONEVISION_NAMED_TOKENS)


def build_llava_next_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny-LLaVA tokenizer as is (``<s>`` BOS, ``<image>``, ``<pad>``) with left padding and llava-v1.6's
    4096-token limit (both saved with it)."""
    tokenizer = build_tokenizer()
    settings = {"padding_side": "left", "model_max_length": 4096}
    tokenizer.init_kwargs.update(settings)
    for name, value in settings.items():
        setattr(tokenizer, name, value)
    return tokenizer


# ------------------------------------------------------------------------ torchvision-free video processing


class PilVideoProcessor(VideoProcessorMixin, PilBackend):
    """A video processor on PIL/NumPy. Decoded videos (a list of PIL frames, a ``[T, H, W, C]`` array or
    tensor, or a batch of those) are resized / rescaled / normalised frame by frame into
    ``pixel_values_videos`` ``[B, T, C, H, W]``; video files are not decoded (that needs av, decord or
    torchvision). Subclasses carry a native video processor's defaults and save under its name."""

    resample = PILImageResampling.BICUBIC
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = False

    def sample_frames(
        self, metadata: VideoMetadata, num_frames: int | None = None, fps: float | None = None, **kwargs: Any
    ) -> np.ndarray:
        """Uniformly sampled indices of ``num_frames`` frames (or ``fps`` frames per second)."""
        num_frames = num_frames if num_frames is not None else self.num_frames
        fps = fps if fps is not None else self.fps
        return default_sample_indices_fn(metadata=metadata, num_frames=num_frames, fps=fps)

    def _decode_and_sample_videos(
        self, videos, video_metadata, do_sample_frames=None, sample_indices_fn=None
    ):
        videos = make_batched_videos(videos)
        if not all(is_valid_video(video) for video in videos):
            raise ValueError(f"{type(self).__name__} takes decoded frames (PIL images, [T, H, W, C] arrays)")
        metadata = make_batched_metadata(videos, video_metadata=video_metadata)
        if do_sample_frames:
            for meta in metadata:
                meta.frames_indices = sample_indices_fn(metadata=meta)
            videos = [video[meta.frames_indices] for video, meta in zip(videos, metadata, strict=True)]
        return videos, metadata

    def _prepare_input_videos(self, videos, do_convert_rgb=None, input_data_format=None, device=None):
        kwargs = dict(do_convert_rgb=do_convert_rgb, input_data_format=input_data_format)
        return [[self.process_image(frame, **kwargs) for frame in video] for video in videos]

    def _preprocess(self, videos, return_tensors=None, **kwargs: Any) -> BatchFeature:
        stacked = [np.stack([self._frame(frame, **kwargs) for frame in video]) for video in videos]
        return BatchFeature({"pixel_values_videos": stacked}, tensor_type=return_tensors)

    def _frame(
        self, frame: np.ndarray, *, do_resize, size, resample, do_center_crop, crop_size, do_rescale,
        rescale_factor, do_normalize, image_mean, image_std, **kwargs: Any,
    ) -> np.ndarray:  # fmt: skip
        if do_resize:
            frame = self.resize(frame, size=size, resample=resample)
        if do_center_crop:
            frame = self.center_crop(frame, crop_size)
        if do_rescale:
            frame = self.rescale(frame, rescale_factor)
        if do_normalize:
            frame = self.normalize(frame, image_mean, image_std)
        return frame

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["video_processor_type"] = out["video_processor_type"].removesuffix("Pil")
        return out


class LlavaOnevisionVideoProcessorPil(PilVideoProcessor):
    """PIL twin of ``LlavaOnevisionVideoProcessor`` (same defaults; saved under that name)."""

    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 384, "width": 384}
    rescale_factor = 1 / 255
    default_to_square = False
    crop_size = None
    do_center_crop = None


class InternVLVideoProcessorPil(PilVideoProcessor):
    """PIL twin of ``InternVLVideoProcessor`` (its defaults, no ``initial_shift``; saved under that name)."""

    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 384, "width": 384}


# model_type -> (native processor class, PIL video processor class)
_VIDEO_PROCESSORS: dict[str, tuple[type[ProcessorMixin], type[PilVideoProcessor]]] = {
    "internvl": (InternVLProcessor, InternVLVideoProcessorPil),
    "llava_onevision": (LlavaOnevisionProcessor, LlavaOnevisionVideoProcessorPil),
}


@contextmanager
def video_processor_base_exported() -> Iterator[None]:
    """Let ``ProcessorMixin`` type-check a video processor when torchvision is missing.

    ``check_argument_for_proper_class`` resolves ``transformers.VideoProcessorMixin``, which 5.23 exports only
    with torchvision (without it the lookup dies: ``AttributeError: type object 'VIDEO_PROCESSOR_MAPPING' has
    no attribute '_extra_content'``). This exports the torchvision-free base class for the block's duration.
    """
    module = processing_utils.transformers_module  # what the check reads (a re-import of the package)
    if hasattr(module, "VideoProcessorMixin"):
        yield
        return
    module.VideoProcessorMixin = VideoProcessorMixin
    try:
        yield
    finally:
        delattr(module, "VideoProcessorMixin")


def load_processor(path: str | Path) -> ProcessorMixin:
    """The processor of an InternVL / LLaVA-NeXT / LLaVA-OneVision checkpoint (tiny or real), with or without
    torchvision: ``AutoProcessor`` where it works, else the native class with a :class:`PilVideoProcessor`."""
    path = str(path)
    model_type = AutoConfig.from_pretrained(path).model_type
    if is_torchvision_available() or model_type not in _VIDEO_PROCESSORS:
        return AutoProcessor.from_pretrained(path)
    processor_class, video_class = _VIDEO_PROCESSORS[model_type]
    parts = {
        "image_processor": AutoImageProcessor.from_pretrained(path),
        "tokenizer": AutoTokenizer.from_pretrained(path),
        "video_processor": video_class.from_pretrained(path),
    }
    processor_dict, init_kwargs = processor_class.get_processor_dict(path)
    with video_processor_base_exported():
        args = [parts[name] for name in processor_class.get_attributes()]
        return processor_class.from_args_and_dict(args, processor_dict, **init_kwargs)


# ------------------------------------------------------------------------------------------ processors


def internvl_tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float = 0.5) -> int:
    """LLM tokens per InternVL tile: the patch grid (CLS dropped) after pixel shuffle."""
    return int((image_size // patch_size) ** 2 * downsample_ratio**2)


def llava_next_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-v1.6's ``image_grid_pinpoints`` for base resolution ``tile``: 1x2, 2x1, 2x2, 3x1, 1x3 tiles."""
    return [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]


def anyres_pinpoints(tile: int, max_tiles_per_side: int = 6) -> list[list[int]]:
    """LLaVA-OneVision's ``image_grid_pinpoints``: every (h, w) grid of 1..6 x 1..6 tiles of side ``tile``."""
    sides = range(1, max_tiles_per_side + 1)
    return [[tile * h, tile * w] for h in sides for w in sides]


def build_internvl_processor(
    *,
    image_size: int,
    patch_size: int,
    downsample_ratio: float = 0.5,
    max_tiles: int = 6,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> InternVLProcessor:
    """InternVL3 processing: GOT-OCR2 tiling (1..``max_tiles`` tiles of ``image_size``, plus a thumbnail when
    there are several), ImageNet mean/std, PIL backends, the InternVL3-hf chat template."""
    size = {"height": image_size, "width": image_size}
    norm = dict(image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD))
    # crop_to_patches=False as in the hub config: InternVLProcessor turns it on at call time.
    image_processor = GotOcr2ImageProcessorPil(
        size=size, crop_to_patches=False, min_patches=1, max_patches=max_tiles, **norm
    )
    with video_processor_base_exported():
        return InternVLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer if tokenizer is not None else build_internvl_tokenizer(),
            video_processor=InternVLVideoProcessorPil(size=size, **norm),
            image_seq_length=internvl_tokens_per_tile(image_size, patch_size, downsample_ratio),
            chat_template=INTERNVL_CHAT_TEMPLATE,
        )


def build_llava_next_processor(
    *,
    image_size: int,
    patch_size: int,
    pinpoints: Sequence[Sequence[int]],
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> LlavaNextProcessor:
    """LLaVA-NeXT processing: CLIP preprocessing, anyres crops over ``pinpoints``, LLaVA-1.5 template."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[list(p) for p in pinpoints],
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_pad=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else build_llava_next_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP CLS, dropped by the "default" strategy
        chat_template=LLAVA_15_CHAT_TEMPLATE,
    )


def build_onevision_processor(
    *,
    image_size: int,
    patch_size: int,
    pinpoints: Sequence[Sequence[int]],
    vision_aspect_ratio: str = "anyres_max_9",
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> LlavaOnevisionProcessor:
    """LLaVA-OneVision processing: SigLIP mean/std, anyres tiles over ``pinpoints``, PIL video frames."""
    size = {"height": image_size, "width": image_size}
    norm = dict(image_mean=list(IMAGENET_STANDARD_MEAN), image_std=list(IMAGENET_STANDARD_STD))
    image_processor = LlavaOnevisionImageProcessorPil(
        size=size, image_grid_pinpoints=[list(p) for p in pinpoints], do_pad=True, **norm
    )
    with video_processor_base_exported():
        return LlavaOnevisionProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer if tokenizer is not None else build_onevision_tokenizer(),
            video_processor=LlavaOnevisionVideoProcessorPil(size=size, **norm),
            num_image_tokens=(image_size // patch_size) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=vision_aspect_ratio,
            chat_template=ONEVISION_CHAT_TEMPLATE,
        )


def family_local_processor(config: PretrainedConfig) -> tuple[ProcessorMixin, dict[str, int]]:
    """For random weights on a real-size config: a locally built processor with the config's vision geometry
    and the config fields (placeholder token ids) to overwrite so that they match its tokenizer."""
    vision = config.vision_config
    geometry = dict(image_size=_side(vision.image_size), patch_size=_side(vision.patch_size))
    if config.model_type == "internvl":
        processor = build_internvl_processor(
            **geometry, downsample_ratio=config.downsample_ratio, max_tiles=12
        )
        return processor, {"image_token_id": processor.image_token_id}
    if config.model_type == "llava_next":
        processor = build_llava_next_processor(**geometry, pinpoints=config.image_grid_pinpoints)
        return processor, {"image_token_id": processor.image_token_id}
    if config.model_type == "llava_onevision":
        processor = build_onevision_processor(
            **geometry, pinpoints=config.image_grid_pinpoints, vision_aspect_ratio=config.vision_aspect_ratio
        )
        return processor, {
            "image_token_id": processor.image_token_id,
            "video_token_id": processor.video_token_id,
        }
    raise ValueError(f"no local processor for model_type '{config.model_type}'")


def _side(value: int | Sequence[int]) -> int:
    return int(value if isinstance(value, int) else value[0])


# --------------------------------------------------------------------------------------------- configs


def _vit(
    *, hidden: int, layers: int, heads: int, intermediate: int, image_size: int, patch_size: int
) -> dict:
    return dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, image_size=image_size, patch_size=patch_size,
    )  # fmt: skip


def _decoder(
    *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, max_pos: int
) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_pos,
    )  # fmt: skip


def qwen2_text_config(decoder: dict, ids: dict[str, int], *, dtype: str = "float32") -> Qwen2Config:
    """An untied Qwen2(.5) decoder config (SiLU, RMSNorm 1e-6, RoPE theta 1e6, no sliding window)."""
    return Qwen2Config(
        **decoder, hidden_act="silu", rms_norm_eps=1e-6, use_sliding_window=False,
        max_window_layers=decoder["num_hidden_layers"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"], dtype=dtype, **ids,
    )  # fmt: skip


def internvl_config(
    vit: dict, text: Qwen2Config, *, image_token_id: int, dtype: str = "float32"
) -> InternVLConfig:
    """``InternVLConfig`` around an InternViT-300M-style tower (qkv bias, LayerNorm, layer scale 0.1); 2x2
    pixel shuffle of the last layer's features with the CLS dropped."""
    vision = InternVLVisionConfig(
        **vit, hidden_act="gelu", attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
        layer_norm_eps=1e-6, layer_scale_init_value=0.1, use_mean_pooling=True,
        use_absolute_position_embeddings=True,
    )  # fmt: skip
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=internvl_tokens_per_tile(vit["image_size"], vit["patch_size"]), downsample_ratio=0.5,
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=False, architectures=["InternVLForConditionalGeneration"], dtype=dtype,
    )  # fmt: skip


def llava_next_config(
    vit: dict, text: LlamaConfig, *, image_token_id: int, pad_token_id: int,
    pinpoints: Sequence[Sequence[int]], projection_dim: int, dtype: str = "float32",
) -> LlavaNextConfig:  # fmt: skip
    """``LlavaNextConfig`` around a CLIP tower (quick-GELU, features of layer -2 with the CLS dropped)."""
    vision = CLIPVisionConfig(
        **vit, projection_dim=projection_dim, hidden_act="quick_gelu", layer_norm_eps=1e-5
    )
    return LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, pad_token_id=pad_token_id,
        image_grid_pinpoints=[list(p) for p in pinpoints],
        image_seq_length=(vit["image_size"] // vit["patch_size"]) ** 2, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
        architectures=["LlavaNextForConditionalGeneration"], dtype=dtype,
    )  # fmt: skip


def onevision_config(
    vit: dict, text: Qwen2Config, *, image_token_id: int, video_token_id: int,
    pinpoints: Sequence[Sequence[int]], dtype: str = "float32",
) -> LlavaOnevisionConfig:  # fmt: skip
    """``LlavaOnevisionConfig`` around a SigLIP tower (no pooling head; last layer, every patch)."""
    vision = SiglipVisionConfig(
        **vit, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False
    )
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        video_token_index=video_token_id, image_grid_pinpoints=[list(p) for p in pinpoints],
        vision_aspect_ratio="anyres_max_9", projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=False,
        architectures=["LlavaOnevisionForConditionalGeneration"], dtype=dtype,
    )  # fmt: skip


# ------------------------------------------------------------------------- full-size reference configs

_INTERNVIT_300M = _vit(hidden=1024, layers=24, heads=16, intermediate=4096, image_size=448, patch_size=14)
_CLIP_L_336 = _vit(hidden=1024, layers=24, heads=16, intermediate=4096, image_size=336, patch_size=14)
# SigLIP-so400m-384 has 27 layers. LLaVA-OneVision uses the penultimate one's features; the llava-hf
# conversion drops the last layer (num_hidden_layers=26 with vision_feature_layer=-1), as the hub config does.
_SIGLIP_SO400M = _vit(hidden=1152, layers=26, heads=16, intermediate=4304, image_size=384, patch_size=14)
_QWEN25_05B = _decoder(
    vocab=151674, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, max_pos=32768
)
_QWEN25_7B = _decoder(
    vocab=151674, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, max_pos=32768
)
_QWEN2_7B = _decoder(
    vocab=152128, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, max_pos=32768
)
_VICUNA_7B = _decoder(
    vocab=32064, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, max_pos=4096
)
_QWEN_IDS = dict(bos_token_id=151643, eos_token_id=151645)


def _internvl3_reference(text: dict) -> InternVLConfig:
    # Untied LM head for both sizes (InternVL3-1B counts 0.94B parameters only with an untied head).
    qwen = qwen2_text_config(text, dict(_QWEN_IDS), dtype="bfloat16")
    return internvl_config(_INTERNVIT_300M, qwen, image_token_id=151667, dtype="bfloat16")


def _llava_next_reference() -> LlavaNextConfig:
    text = LlamaConfig(
        **_VICUNA_7B, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"], dtype="float16",
    )  # fmt: skip
    return llava_next_config(
        _CLIP_L_336, text, image_token_id=32000, pad_token_id=32001, pinpoints=llava_next_pinpoints(336),
        projection_dim=768, dtype="float16",
    )  # fmt: skip


def _onevision_reference() -> LlavaOnevisionConfig:
    qwen = qwen2_text_config(_QWEN2_7B, dict(_QWEN_IDS), dtype="bfloat16")
    return onevision_config(
        _SIGLIP_SO400M, qwen, image_token_id=151646, video_token_id=151647, pinpoints=anyres_pinpoints(384),
        dtype="bfloat16",
    )  # fmt: skip


# name -> (hub checkpoint, config factory).
# llava-hf/LLaVA-Video-7B-Qwen2-hf is a LlavaOnevision-class checkpoint with OneVision-7B's towers
# (SigLIP-so400m minus its last layer, Qwen2-7B): we assume its config equals OneVision-7B's. HF's
# LlavaOnevision code gives it OneVision's video path (2x2 bilinear pooling, one newline per video), not
# LLaVA-Video's original one.
FAMILY_REFERENCE: dict[str, tuple[str, Any]] = {
    "internvl3-1b": ("OpenGVLab/InternVL3-1B-hf", lambda: _internvl3_reference(_QWEN25_05B)),
    "internvl3-8b": ("OpenGVLab/InternVL3-8B-hf", lambda: _internvl3_reference(_QWEN25_7B)),
    "llava-v1.6-vicuna-7b": ("llava-hf/llava-v1.6-vicuna-7b-hf", _llava_next_reference),
    "llava-onevision-qwen2-7b-ov": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", _onevision_reference),
    "llava-video-7b-qwen2": ("llava-hf/LLaVA-Video-7B-Qwen2-hf", _onevision_reference),
}


def family_reference_config(name: str) -> PretrainedConfig:
    """The architecture config of the hub checkpoint behind ``name`` (a key of :data:`FAMILY_REFERENCE`)."""
    if name not in FAMILY_REFERENCE:
        raise KeyError(f"unknown reference config '{name}'; known: {sorted(FAMILY_REFERENCE)}")
    return FAMILY_REFERENCE[name][1]()


def write_family_reference_configs(arch_dir: str | Path = ARCH_DIR) -> list[Path]:
    """(Re)write ``arch/<name>.json`` for every :data:`FAMILY_REFERENCE` entry."""
    return write_configs({name: (lambda n=name: family_reference_config(n)) for name in FAMILY_REFERENCE}, arch_dir)


# ---------------------------------------------------------------------------------------- tiny models


def _tiny_parts(
    tokenizer: PreTrainedTokenizerFast, *, image_size: int, patch_size: int, vision_layers: int,
    vision_hidden: int, vision_heads: int, text_layers: int, text_hidden: int, text_heads: int,
    text_kv_heads: int | None, intermediate_mult: int,
) -> tuple[dict, dict]:  # fmt: skip
    """Vision-tower and decoder size kwargs; the vocabulary is the tokenizer's."""
    vit = _vit(
        hidden=vision_hidden, layers=vision_layers, heads=vision_heads,
        intermediate=vision_hidden * intermediate_mult, image_size=image_size, patch_size=patch_size,
    )  # fmt: skip
    decoder = _decoder(
        vocab=len(tokenizer), hidden=text_hidden, layers=text_layers, heads=text_heads,
        kv_heads=text_kv_heads or text_heads, intermediate=text_hidden * intermediate_mult, max_pos=4096,
    )  # fmt: skip
    return vit, decoder


def _qwen_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return dict(bos_token_id=eot, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _init_model(
    family: str, config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast, seed: int
) -> PreTrainedModel:
    """Seeded random model; the ``lm_head`` rows of all added tokens are zero (never generated)."""
    model = build_qwen_model(MODEL_CLASSES[family], config, seed, sorted(tokenizer.added_tokens_decoder))
    if family == "llava_next":  # Llama: the one eos </s>, not Qwen's [<|im_end|>, <|endoftext|>]
        model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model


def _family_card(family: str, seed: int, sizes: dict[str, Any], num_params: int, notes: str) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sizes.items())
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [prunebench, {family}, random-weights, testing]
---
# prunebench tiny-{family} (random weights)

Built locally by `prunebench.models.tiny_families` — nothing was downloaded.

**The weights are untrained random initialisation (seed {seed}). Any accuracy measured with this
model is noise.** It exists to exercise `{MODEL_CLASSES[family].__name__}` pipelines and visual-token
pruning on CPU.

- parameters: {num_params:,}
- tokenizer: byte-level BPE trained on the prunebench shapes-dataset templates + the family's special tokens
- the `lm_head` rows of the special tokens are zero: greedy decoding never emits them
- processor: load with `prunebench.models.tiny_families.load_processor(path)` (works without torchvision)
{notes}
| setting | value |
|---|---|
| seed | {seed} |
{rows}
"""


def _finish(family: str, path: str | Path, model, processor, seed: int, sizes: dict, notes: str) -> Path:
    path = Path(path)
    num_params = sum(p.numel() for p in model.parameters())
    _save(path, model, processor, _family_card(family, seed, sizes, num_params, notes))
    verify_tiny_family(path)
    return path


def build_tiny_internvl(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 8,
    max_tiles: int = 6,
    vision_layers: int = 4,
    vision_hidden: int = 64,
    vision_heads: int = 4,
    text_layers: int = 4,
    text_hidden: int = 128,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    intermediate_mult: int = 4,
) -> Path:
    """Build, save (safetensors + tokenizer + processor + README) and verify a tiny InternVL3 at ``path``.

    ``image_size``/``patch_size`` 64/8: 8x8 patches (+ CLS) per tile, 2x2 pixel shuffle -> 16 LLM tokens per
    tile. A square image up to ~1.41x ``image_size`` gives 1 tile and no thumbnail; larger or non-square
    images give up to ``max_tiles`` tiles plus a thumbnail.
    """
    if (image_size // patch_size) % 2:
        raise ValueError("image_size // patch_size must be even for the 2x2 pixel shuffle")
    sizes = dict(
        image_size=image_size, patch_size=patch_size, vision_layers=vision_layers,
        vision_hidden=vision_hidden, vision_heads=vision_heads, text_layers=text_layers,
        text_hidden=text_hidden, text_heads=text_heads, text_kv_heads=text_kv_heads,
        intermediate_mult=intermediate_mult,
    )  # fmt: skip
    tokenizer = build_internvl_tokenizer()
    vit, decoder = _tiny_parts(tokenizer, **sizes)
    text = qwen2_text_config(decoder, _qwen_ids(tokenizer))
    config = internvl_config(vit, text, image_token_id=tokenizer.context_image_token_id)
    processor = build_internvl_processor(
        image_size=image_size, patch_size=patch_size, max_tiles=max_tiles, tokenizer=tokenizer
    )
    model = _init_model("internvl", config, tokenizer, seed)
    notes = f"- prompt: `{internvl_prompt('{question}')!r}`; {config.image_seq_length} tokens per tile\n"
    return _finish("internvl", path, model, processor, seed, dict(**sizes, max_tiles=max_tiles), notes)


def build_tiny_llava_next(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 48,
    patch_size: int = 8,
    pinpoints: Sequence[Sequence[int]] | None = None,
    vision_layers: int = 4,
    vision_hidden: int = 64,
    vision_heads: int = 4,
    text_layers: int = 4,
    text_hidden: int = 128,
    text_heads: int = 4,
    text_kv_heads: int | None = None,
    intermediate_mult: int = 4,
) -> Path:
    """Build, save and verify a tiny LLaVA-NeXT (vicuna-style: Llama decoder, no GQA by default) at ``path``.

    ``pinpoints`` default to LLaVA-v1.6's scaled to ``image_size`` (48: [[48, 96], [96, 48], [96, 96],
    [144, 48], [48, 144]]); 6x6 = 36 tokens per view (base image or crop).
    """
    sizes = dict(
        image_size=image_size, patch_size=patch_size, vision_layers=vision_layers,
        vision_hidden=vision_hidden, vision_heads=vision_heads, text_layers=text_layers,
        text_hidden=text_hidden, text_heads=text_heads, text_kv_heads=text_kv_heads,
        intermediate_mult=intermediate_mult,
    )  # fmt: skip
    pinpoints = [list(p) for p in (pinpoints or llava_next_pinpoints(image_size))]
    tokenizer = build_llava_next_tokenizer()
    vit, decoder = _tiny_parts(tokenizer, **sizes)
    text = LlamaConfig(
        **decoder, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    config = llava_next_config(
        vit, text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE), pad_token_id=tokenizer.pad_token_id,
        pinpoints=pinpoints, projection_dim=vision_hidden,
    )  # fmt: skip
    processor = build_llava_next_processor(
        image_size=image_size, patch_size=patch_size, pinpoints=pinpoints, tokenizer=tokenizer
    )
    model = _init_model("llava_next", config, tokenizer, seed)
    notes = f"- prompt: `{llava_next_prompt('{question}')!r}`; pinpoints {pinpoints}\n"
    return _finish("llava_next", path, model, processor, seed, sizes, notes)


def build_tiny_onevision(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 48,
    patch_size: int = 8,
    vision_layers: int = 4,
    vision_hidden: int = 64,
    vision_heads: int = 4,
    text_layers: int = 4,
    text_hidden: int = 128,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    intermediate_mult: int = 4,
) -> Path:
    """Build, save and verify a tiny LLaVA-OneVision at ``path``: 6x6 = 36 tokens per view, anyres-max-9 over
    1..6 x 1..6 tiles of ``image_size``, 3x3 = 9 tokens per video frame (+1 newline per video)."""
    sizes = dict(
        image_size=image_size, patch_size=patch_size, vision_layers=vision_layers,
        vision_hidden=vision_hidden, vision_heads=vision_heads, text_layers=text_layers,
        text_hidden=text_hidden, text_heads=text_heads, text_kv_heads=text_kv_heads,
        intermediate_mult=intermediate_mult,
    )  # fmt: skip
    pinpoints = anyres_pinpoints(image_size)
    tokenizer = build_onevision_tokenizer()
    vit, decoder = _tiny_parts(tokenizer, **sizes)
    config = onevision_config(
        vit, qwen2_text_config(decoder, _qwen_ids(tokenizer)), image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id, pinpoints=pinpoints,
    )  # fmt: skip
    processor = build_onevision_processor(
        image_size=image_size, patch_size=patch_size, pinpoints=pinpoints, tokenizer=tokenizer
    )
    model = _init_model("llava_onevision", config, tokenizer, seed)
    image, video = onevision_prompt("{question}"), onevision_prompt("{question}", video=True)
    notes = f"- prompts: `{image!r}`, `{video!r}`\n"
    return _finish("llava_onevision", path, model, processor, seed, sizes, notes)


def ensure_tiny_internvl(path: str | Path, **kwargs: Any) -> Path:
    """Build the tiny InternVL3 at ``path`` unless ``path/config.json`` exists (atomic)."""
    return ensure_built(path, build_tiny_internvl, **kwargs)


def ensure_tiny_llava_next(path: str | Path, **kwargs: Any) -> Path:
    """Build the tiny LLaVA-NeXT at ``path`` unless ``path/config.json`` exists (atomic)."""
    return ensure_built(path, build_tiny_llava_next, **kwargs)


def ensure_tiny_onevision(path: str | Path, **kwargs: Any) -> Path:
    """Build the tiny LLaVA-OneVision at ``path`` unless ``path/config.json`` exists (atomic)."""
    return ensure_built(path, build_tiny_onevision, **kwargs)


# ---------------------------------------------------------------------------------------- verification


def visual_feature_count(features: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Number of LLM visual tokens in a ``get_image_features`` / ``get_video_features`` ``pooler_output``:
    a tensor ``[..., D]`` (InternVL tiles, OneVision videos) or a list of ``[n_i, D]`` (anyres images)."""
    if isinstance(features, torch.Tensor):
        return features.numel() // features.shape[-1]
    return sum(int(f.shape[0]) for f in features)


def _count(inputs: dict[str, Any], token_id: int) -> int:
    return int((inputs["input_ids"] == token_id).sum())


def _check_image(model: PreTrainedModel, processor: ProcessorMixin) -> None:
    from PIL import Image

    side = _side(model.config.vision_config.image_size)
    image = Image.new("RGB", (2 * side, side), (128, 64, 32))  # wide: several tiles / crops
    prompt = {
        "internvl": internvl_prompt,
        "llava_next": llava_next_prompt,
        "llava_onevision": onevision_prompt,
    }
    inputs = processor(
        images=image, text=prompt[model.config.model_type]("What colour?"), return_tensors="pt"
    )
    extra = {k: inputs[k] for k in ("image_sizes",) if k in inputs}
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"], **extra).pooler_output
    got, made = _count(inputs, model.config.image_token_id), visual_feature_count(features)
    if got != made:
        raise RuntimeError(f"processor expanded the image into {got} tokens, the model makes {made} features")
    _check_generate(model, inputs)


def _check_video(model: PreTrainedModel, processor: ProcessorMixin) -> None:
    side = _side(model.config.vision_config.image_size)
    frames = np.full((4, side, side, 3), 96, dtype=np.uint8)
    inputs = processor(videos=frames, text=onevision_prompt("What happens?", video=True), return_tensors="pt")
    with torch.no_grad():
        features = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output
    got, made = _count(inputs, model.config.video_token_id), visual_feature_count(features)
    if got != made:
        raise RuntimeError(f"processor expanded the video into {got} tokens, the model makes {made} features")
    _check_generate(model, inputs)


def _check_generate(model: PreTrainedModel, inputs: dict[str, Any]) -> None:
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    if logits.shape != (*inputs["input_ids"].shape, model.config.text_config.vocab_size):
        raise RuntimeError(f"unexpected logits shape {tuple(logits.shape)}")
    if out.shape[1] != inputs["input_ids"].shape[1] + 3:
        raise RuntimeError(f"generate made {out.shape[1] - inputs['input_ids'].shape[1]} tokens, not 3")


def verify_tiny_family(path: str | Path) -> None:
    """Load ``path`` back (:func:`load_processor`, ``from_pretrained``); check the vocabulary and placeholder
    ids, that the processor expands an image (and, for OneVision, a video) into as many tokens as the model
    makes visual features, a forward pass and ``generate``."""
    config = AutoConfig.from_pretrained(path)
    processor = load_processor(path)
    model = MODEL_CLASSES[config.model_type].from_pretrained(path).eval()
    if config.text_config.vocab_size != len(processor.tokenizer):
        raise RuntimeError(f"vocab {config.text_config.vocab_size} != tokenizer {len(processor.tokenizer)}")
    if config.image_token_id != processor.image_token_id:
        raise RuntimeError(
            f"image_token_id {config.image_token_id} != processor's {processor.image_token_id}"
        )
    _check_image(model, processor)
    if config.model_type == "llava_onevision":
        if config.video_token_id != processor.video_token_id:
            raise RuntimeError(
                f"video_token_id {config.video_token_id} != processor's {processor.video_token_id}"
            )
        _check_video(model, processor)
