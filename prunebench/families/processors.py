"""Processor loading without torchvision, for tiny and real checkpoints alike (transformers 5.23).

- Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the native processors take a video processor, and every video processor class
  (``VideoProcessorMixin`` included) needs torchvision, so ``AutoProcessor.from_pretrained`` fails on any
  Qwen-VL checkpoint without it. :class:`Qwen2_5_VLImageTextProcessor` / :class:`Qwen2VLImageTextProcessor`
  are the native processors minus the video processor, saved under the native class name
  (:func:`load_qwen_processor`).
- InternVL / LLaVA-OneVision: ``ProcessorMixin`` type-checks a video processor against
  ``transformers.VideoProcessorMixin``, exported only with torchvision, so the native processors cannot be
  constructed. :class:`PilVideoProcessor` is a PIL/NumPy video processor (decoded frames) saved under the
  native class name; :func:`load_processor` loads the three packed/tiled families with or without torchvision.
  ``LlavaNextProcessor`` has no video processor: ``AutoProcessor`` works.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    InternVLProcessor,
    LlavaOnevisionProcessor,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
    processing_utils,
)
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import (
    VideoMetadata,
    default_sample_indices_fn,
    is_valid_video,
    make_batched_metadata,
    make_batched_videos,
)

# ---------------------------------------------------------------------------------- Qwen-VL, image + text


class ImageTextOnly:
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


class Qwen2_5_VLImageTextProcessor(ImageTextOnly, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images and text only: works without torchvision."""

    native_class = Qwen2_5_VLProcessor


class Qwen2VLImageTextProcessor(ImageTextOnly, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text only: works without torchvision."""

    native_class = Qwen2VLProcessor


class Qwen3VLImageTextProcessor(ImageTextOnly, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` for images and text only: works without torchvision (its video processor needs it;
    a real checkpoint's ``video_preprocessor_config.json`` is ignored)."""

    native_class = Qwen3VLProcessor


PROCESSORS = {"qwen2_5_vl": Qwen2_5_VLImageTextProcessor, "qwen2_vl": Qwen2VLImageTextProcessor,
              "qwen3_vl": Qwen3VLImageTextProcessor}


def load_qwen_processor(path: str | Path, **kwargs: Any) -> ImageTextOnly:
    """Load the (image+text) processor of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint, tiny or real, without
    torchvision."""
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in PROCESSORS:
        raise ValueError(f"{path} is a '{model_type}' checkpoint, not one of {sorted(PROCESSORS)}")
    return PROCESSORS[model_type].from_pretrained(path, **kwargs)


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
_VIDEOPROCESSORS: dict[str, tuple[type[ProcessorMixin], type[PilVideoProcessor]]] = {
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


def load_processor(path: str | Path, **kwargs: Any) -> ProcessorMixin:
    """The processor of an InternVL / LLaVA-NeXT / LLaVA-OneVision checkpoint (tiny or real), with or without
    torchvision: ``AutoProcessor`` where it works, else the native class with a :class:`PilVideoProcessor`."""
    if kwargs:
        from prunebench.errors import UserError

        raise UserError(f"processor_kwargs are not supported for this family yet (got {sorted(kwargs)})")
    path = str(path)
    model_type = AutoConfig.from_pretrained(path).model_type
    if is_torchvision_available() or model_type not in _VIDEOPROCESSORS:
        return AutoProcessor.from_pretrained(path)
    processor_class, video_class = _VIDEOPROCESSORS[model_type]
    parts = {
        "image_processor": AutoImageProcessor.from_pretrained(path),
        "tokenizer": AutoTokenizer.from_pretrained(path),
        "video_processor": video_class.from_pretrained(path),
    }
    processor_dict, init_kwargs = processor_class.get_processor_dict(path)
    with video_processor_base_exported():
        args = [parts[name] for name in processor_class.get_attributes()]
        return processor_class.from_args_and_dict(args, processor_dict, **init_kwargs)
