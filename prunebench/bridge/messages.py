"""VLMEvalKit message -> the family's chat template and processor inputs.

A message is VLMEvalKit's interleaved list `[{"type": "image"|"video"|"text", "value": ...}]`
(image values are file paths). Images and text keep their order in the conversation, so each
family's own chat template places its image tokens where the benchmark put the image.

Video benchmarks (`to_video_conversation`): VLMEvalKit's video datasets send either the sampled
frames of one video as image parts (`video_llm=False`: the dataset samples `nframe` frames / `fps`
and writes them as JPEGs) or the video file as one `video` part (`video_llm=True`). Either way the
family's processor gets ONE video (`videos=[frames]`), so its video path (per-frame pooling,
newline, per-frame budgets) runs exactly as on the built-in `shapes_video` set. The video
placeholder stands where the first frame (or the video part) was; text parts keep their order.
Message `role` keys (MVBench's system text and its assistant-side "Best option:(") are not turned
into turns: all text goes into the one user turn, as VLMEvalKit's own LLaVA-OneVision wrapper does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prunebench.errors import UserError

Message = Sequence[Mapping[str, Any]]


def to_conversation(message: Message) -> tuple[list[dict[str, Any]], list[str]]:
    """-> (one user turn for `apply_chat_template`, image paths in order of appearance).

    Consecutive text pieces are joined with a newline (VLMEvalKit's own convention in
    `message_to_promptimg`); images become `{"type": "image"}` placeholders in place.
    """
    content: list[dict[str, Any]] = []
    images: list[str] = []
    for piece in message:
        kind, value = piece.get("type"), piece.get("value")
        if kind == "image":
            content.append({"type": "image"})
            images.append(str(value))
        elif kind == "text":
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += "\n" + str(value)
            else:
                content.append({"type": "text", "text": str(value)})
        else:
            raise UserError(f"message part of type '{kind}' is not supported by the bridge; valid: image, text")
    if not images:
        raise UserError("a VLMEvalKit message without an image cannot be pruned; valid: at least one image part")
    return [{"role": "user", "content": content}], images


def to_video_conversation(message: Message) -> tuple[list[dict[str, Any]], list[str], str | None]:
    """-> (one user turn with one `{"type": "video"}`, frame paths in order, video file or None).

    Frames (image parts) and a video file (a `video` part) are exclusive: one video per message.
    Empty text parts (Video-MME's and LongVideoBench's empty system prompt) are dropped.
    """
    content: list[dict[str, Any]] = []
    frames: list[str] = []
    video: str | None = None
    for piece in message:
        kind, value = piece.get("type"), piece.get("value")
        if kind in ("image", "video"):
            if video is not None or (kind == "video" and frames):
                raise UserError("a video message must hold the frames of one video or one video file; "
                                "valid: image parts (frames) or a single video part")
            if not frames and video is None:
                content.append({"type": "video"})
            frames += [str(value)] if kind == "image" else []
            video = str(value) if kind == "video" else None
        elif kind == "text":
            if not str(value).strip():
                continue
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += "\n" + str(value)
            else:
                content.append({"type": "text", "text": str(value)})
        else:
            raise UserError(f"message part of type '{kind}' is not supported by the bridge; valid: image, video, text")
    if not frames and video is None:
        raise UserError("a VLMEvalKit video message without frames or a video cannot be pruned; "
                        "valid: image parts (frames) or a video part")
    return [{"role": "user", "content": content}], frames, video


def uniform_indices(n_frames: int, nframe: int) -> list[int]:
    """VLMEvalKit's `nframe` sampling (`VideoBaseDataset.save_video_frames`): the `nframe` interior
    points of `nframe + 1` equal segments, `int(i * len / (nframe + 1))` for i = 1..nframe."""
    if nframe < 1 or n_frames < 1:
        raise UserError(f"cannot sample {nframe} frames from a video of {n_frames} frames; valid: nframe >= 1")
    step = n_frames / (nframe + 1)
    return [int(i * step) for i in range(1, nframe + 1)]


def read_video(path: str, nframe: int) -> list[Any]:
    """`nframe` frames of a video file (decord, as VLMEvalKit; only needed when `video_llm` is on)."""
    from PIL import Image

    try:
        import decord
    except ImportError:
        raise UserError("video_llm=true needs decord to read video files (pip install decord); valid: "
                        "video_llm=false (VLMEvalKit writes the sampled frames as images)") from None
    reader = decord.VideoReader(path, num_threads=1)
    return [Image.fromarray(reader[i].asnumpy()) for i in uniform_indices(len(reader), nframe)]


def build_video_inputs(processor: Any, message: Message, nframe: int) -> Any:
    """Processor inputs (`input_ids`, `pixel_values_videos`, ...) for one video message."""
    from PIL import Image

    conversation, frames, video = to_video_conversation(message)
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    images = read_video(video, nframe) if video else [Image.open(p).convert("RGB") for p in frames]
    return processor(text=prompt, videos=[images], return_tensors="pt")


def build_inputs(processor: Any, message: Message) -> Any:
    """Processor inputs (`input_ids`, `pixel_values`, ...) for one message, as `return_tensors="pt"`."""
    from PIL import Image

    conversation, paths = to_conversation(message)
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    images = [Image.open(p).convert("RGB") for p in paths]
    return processor(text=prompt, images=images, return_tensors="pt")
