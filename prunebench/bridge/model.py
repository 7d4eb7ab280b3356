"""The prunebench model as a VLMEvalKit `BaseModel` (class created lazily: vlmeval is optional).

`Session` does the work and knows nothing about VLMEvalKit: message -> the family's processor ->
pruned greedy generation timed exactly as the built-in runner (`generation.generate_timed`). Each answer
is appended (and flushed) to this rank's predictions JSON-lines file at once, with its timings and
token counts; a rerun answers indices found there from the file, so a run killed between
VLMEvalKit's periodic pickle dumps loses nothing and answers no index twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prunebench.bridge.messages import Message, build_inputs, build_video_inputs
from prunebench.record import read_jsonl


def read_answers(paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """Rows by str(index) from JSON-lines files; a torn last line (killed mid-write) is ignored."""
    return {str(row["index"]): row for path in paths for row in read_jsonl(path)}


class Session:
    """Answers VLMEvalKit messages with the loaded model under an installed pruning method."""

    def __init__(self, loaded: Any, inst: Any, timer: Any, seed: int, max_new_tokens: int, sink: Path,
                 known: dict[str, dict[str, Any]], warmup: int = 1, nframe: int = 0) -> None:
        self.loaded, self.inst, self.timer = loaded, inst, timer
        self.seed, self.max_new_tokens, self.sink = seed, max_new_tokens, sink
        self.known = known
        self.index: Any = None  # set by the dataset's build_prompt just before each generate
        self.generated = 0
        self.warmup = warmup  # untimed generations before the first timed one, as the runner does
        self.nframe = nframe  # > 0: a video benchmark (frames of one video -> the processor's videos=)

    def answer(self, message: Message) -> str:
        """The answer to one message, appended to the sink. With an index (set by `track_index` before each call,
        then cleared) it is reused on a rerun; without one it is generated afresh, never served from another
        message's answer (its row's index is null)."""
        index, self.index = self.index, None
        key = None if index is None else str(index)
        if key is not None and key in self.known:  # answered before a kill: never generate it twice
            return str(self.known[key]["prediction"])
        processor = self.loaded.processor
        video = self.nframe > 0
        inputs = (build_video_inputs(processor, message, self.nframe) if video
                  else build_inputs(processor, message)).to(self.loaded.device)
        from prunebench.generation import generate_timed

        reseed = self._reseed(index)
        for _ in range(self.warmup):
            generate_timed(self.loaded, inputs, self.inst, self.timer, reseed, self.max_new_tokens, flops=False)
        self.warmup = 0
        extra = generate_timed(self.loaded, inputs, self.inst, self.timer, reseed, self.max_new_tokens)
        frames = _n_frames(inputs) if video else 0
        row = {"index": index, "prediction": extra.pop("text"), "error": None, "n_frames": frames, **extra}
        self.generated += 1
        with self.sink.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if key is not None:  # without an index there is nothing to resume it by
            self.known[key] = row
        return row["prediction"]

    def _reseed(self, index: Any) -> int:
        # the runner's per-sample seed; VLMEvalKit indices may be strings (HallusionBench); no index: the call count
        from prunebench.generation import sample_seed

        if index is None:
            return sample_seed(self.seed, self.generated)
        try:
            number = int(index)
        except (TypeError, ValueError):
            number = int.from_bytes(str(index).encode()[:8].ljust(8, b"\0"), "little")
        return sample_seed(self.seed, number)


def _n_frames(inputs: Any) -> int:
    """Frames of the one video in the processor's output (`pixel_values_videos` [1, T, C, H, W])."""
    return int(inputs["pixel_values_videos"].shape[1]) if "pixel_values_videos" in inputs else 0


def make_vlm(api: Any, session: Session, video_llm: bool = False) -> Any:
    """A `vlmeval.vlm.base.BaseModel` instance answering through `session`.

    `VIDEO_LLM` tells VLMEvalKit's video datasets what to send: False (default) the frames they
    sample and write as images, True the video file (decoded here, `session.nframe` frames).
    """

    class PrunebenchVLM(api.BaseModel):
        INTERLEAVE = True
        VIDEO_LLM = video_llm
        allowed_types = ["text", "image", "video"]

        def __init__(self) -> None:
            super().__init__()

        def generate_inner(self, message: Message, dataset: str | None = None) -> str:
            return session.answer(message)

    return PrunebenchVLM()


def track_index(dataset: Any, session: Session) -> None:
    """Tell the session which index VLMEvalKit asks about: it builds each prompt right before generate."""
    build = dataset.build_prompt

    def build_prompt(line: Any, *args: Any, **kwargs: Any) -> Any:  # video sets also pass video_llm
        index = dataset.data.iloc[line]["index"] if isinstance(line, int) else line["index"]
        session.index = index.item() if hasattr(index, "item") else index  # numpy -> JSON-able
        return build(line, *args, **kwargs)

    dataset.build_prompt = build_prompt
