"""VLMEvalKit message -> the family's chat template and processor inputs.

A message is VLMEvalKit's interleaved list `[{"type": "image"|"video"|"text", "value": ...}]`
(image values are file paths). Images and text keep their order in the conversation, so each
family's own chat template places its image tokens where the benchmark put the image.
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


def build_inputs(processor: Any, message: Message) -> Any:
    """Processor inputs (`input_ids`, `pixel_values`, ...) for one message, as `return_tensors="pt"`."""
    from PIL import Image

    conversation, paths = to_conversation(message)
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    images = [Image.open(p).convert("RGB") for p in paths]
    return processor(text=prompt, images=images, return_tensors="pt")
