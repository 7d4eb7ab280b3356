"""Timed greedy generation of a prepared batch under an installed method: the per-sample fields of
`predictions.jsonl` (text, stage timings, token counts, KV bytes, FLOPs). Every backend generates through here,
so all of them time exactly the same thing.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from prunebench.data.datasets import Item
from prunebench.errors import UserError
from prunebench.flops import count_flops
from prunebench.kept import kept_fields, split_layout
from prunebench.measure import kv_cache_bytes, prefill_cache_bytes
from prunebench.models.loader import LoadedModel
from prunebench.stages import Installation
from prunebench.stages.inputs import Prepared
from prunebench.timing import Timer


def sample_seed(seed: int, index: int) -> int:
    """The seed a sample runs under (its random picks): the job's seed and the sample's index, as every backend
    reseeds, so a sample draws the same stream in any backend, batch or order."""
    return seed * 1_000_003 + index


def batch_inputs(loaded: LoadedModel, batch: list[Item], inst: Installation | None = None) -> Any:
    """The processor's tensors for a batch of samples (several: left-padded, as generation needs), on the model's
    device: processed once per batch of items and preparation for the life of the loaded model (`LoadedModel.inputs`);
    each call returns a fresh mapping, so a caller may replace its entries.

    inst: the installed method; an input-stage one (`method=downsample`) prepares the images first, and its
    preparation is part of the cache key (a resized batch is never served unresized, or the reverse). The mapping's
    `n_visual_unresized` then holds each row's visual tokens without it (the record's n_visual_in)."""
    from transformers import BatchFeature

    prepared = None if inst is None or inst.inputs is None else inst.inputs.prepare(loaded.processor, batch)
    key = () if prepared is None else prepared.key
    cached = loaded.inputs.get(batch, key)
    if cached is None:
        cached = _processed(loaded, batch, prepared)
        loaded.inputs.put(batch, cached, key)
    out = BatchFeature(dict(cached)).to(loaded.device)
    out.n_visual_unresized = None if prepared is None else list(prepared.unresized)
    return out


def _processed(loaded: LoadedModel, batch: list[Item], prepared: Prepared | None = None) -> Any:
    processor = loaded.processor
    images = [it.image for it in batch] if prepared is None else prepared.images
    extra = {} if prepared is None else dict(prepared.kwargs)
    video = bool(batch[0].frames)
    visual = {"type": "video"} if video else {"type": "image"}
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [visual, {"type": "text", "text": item.question}]}], add_generation_prompt=True)
        for item in batch]
    if len(batch) == 1:  # exactly the single-sample call, no padding arguments
        media = {"videos": [list(batch[0].frames)]} if video else {"images": images[0]}
        inputs = processor(text=prompts[0], return_tensors="pt", **media, **extra)
    else:
        media = {"videos": [list(it.frames) for it in batch]} if video else {"images": images}
        inputs = processor(text=prompts, return_tensors="pt", padding=True, padding_side="left", **media, **extra)
    if not any(k in inputs for k in ("pixel_values", "pixel_values_videos")):
        kind = "videos" if video else "images"
        raise UserError(f"the processor of model '{loaded.name}' produced no pixels for {kind} "
                        f"(its {kind[:-1]} processor is missing or unsupported here)")
    return inputs


def generate_timed(loaded: LoadedModel, inputs: Any, inst: Installation, timer: Timer, reseed: int,
                   max_new_tokens: int, flops: bool = True) -> dict[str, Any]:
    """Greedy generation of one prepared sample under the installed method, with the stage timings.

    -> {"text", "timing", token counts, ...}: the per-sample fields of predictions.jsonl (shared by
    the built-in runner and the VLMEvalKit bridge, so both time exactly the same thing). `flops`: count the
    sample's FLOPs in a second, untimed pass (off for warm-up runs, whose rows are not kept).
    """
    return generate_batch_timed(loaded, inputs, inst, timer, [reseed], max_new_tokens,
                                count=[inputs] if flops else None)[0]


def generate_batch_timed(loaded: LoadedModel, inputs: Any, inst: Installation, timer: Timer, reseeds: list[int],
                         max_new_tokens: int, count: list[Any] | None = None) -> list[dict[str, Any]]:
    """Greedy generation of a prepared batch (B rows, left-padded when B > 1), one row dict per sample.

    Times are the batch's (what each of its samples waits for: `batch_size` says how many shared it); token
    counts are the row's own; KV bytes are the row's share of the batch's cache (1/B, padding included).
    `count`: each sample's own (batch-1) inputs, whose FLOPs are counted in a separate untimed pass after the
    timed one, so a sample's FLOPs do not depend on its batch; None counts nothing (warm-ups, controls).
    """
    processor, model = loaded.processor, loaded.model
    _pixels_to(inputs, loaded.dtype)
    tok = processor.tokenizer
    eos = tok.eos_token_id
    gen = _greedy(max_new_tokens, tok.pad_token_id, tuple(eos) if isinstance(eos, list) else eos, tok.bos_token_id)
    b = inputs["input_ids"].shape[0]
    inst.reseed_rows(reseeds)
    cuda = loaded.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(loaded.device)
    timer.reset()
    with torch.inference_mode(), prefill_cache_bytes(model) as kv:
        timer.start("total")
        output = model.generate(**inputs, generation_config=gen)
        timer.stop("total")
    kv_prefill = [n // b for n in kv.get("prefill", [])]
    kv_end = [n // b for n in kv_cache_bytes(kv.get("cache"))]
    seconds, forwards = timer.seconds(), timer.spans("forward")
    decode_s = sum(forwards[1:])
    timing = {"total_s": seconds.get("total", 0.0), "vision_s": seconds.get("vision", 0.0),
              "method_s": seconds.get("method", 0.0), "prefill_s": forwards[0] if forwards else 0.0,
              "decode_s": decode_s, "ttft_s": timer.first_to_first("total", "forward"),
              "tpot_s": decode_s / (len(forwards) - 1) if len(forwards) > 1 else None}
    width = inputs["input_ids"].shape[1]
    real = inputs["attention_mask"].sum(dim=1).tolist() if "attention_mask" in inputs else [width] * b
    entry = inst.state.entry
    counts = inst.state.row_counts if len(inst.state.row_counts) == b else [inst.counts]
    unresized = getattr(inputs, "n_visual_unresized", None)  # an input stage: the tokens before it (N)
    peak = torch.cuda.max_memory_allocated(loaded.device) if cuda else None
    rows = []
    for row in range(b):
        new = _generated(output[row, width:], tok.eos_token_id)
        llm_len = int(real[row]) if entry is None else \
            int(entry.index.shape[1] - (0 if entry.pad is None else entry.pad[row].sum()))
        rows.append({
            "text": tok.decode(new, skip_special_tokens=True).strip(),
            "timing": dict(timing),
            "n_new_tokens": int(new.numel()),
            "prompt_len": int(real[row]),
            "llm_prompt_len": llm_len,
            **counts[row].as_dict(),
            **({"n_visual_in": int(unresized[row])} if unresized else {}),
            **({"vision_merge_schedule": list(inst.schedule)} if inst.schedule is not None else {}),
            **({"stages": inst.stage_counts} if inst.stages else {}),
            "peak_gpu_bytes": peak,
            "kv_layer_bytes_prefill": kv_prefill, "kv_layer_bytes_end": kv_end,
            "batch_size": b,
        })
    if inst.prunes:  # after the timed pass, before the FLOPs pass replays the prompts
        for row, kept in zip(rows, kept_for_rows(loaded, inputs, inst, b), strict=True):
            if kept is not None:
                row["kept"] = kept
    counted = inst.flops_counted
    for row, single, reseed in zip(rows, count or [], reseeds, strict=bool(count)):  # the same picks, counted
        key = flops_signature(single, row)
        if key in counted:  # FLOPs are a function of shapes: a sample shaped like a counted one costs the same
            row["flops"] = {**counted[key], "reused": True}
            continue
        _pixels_to(single, loaded.dtype)
        inst.reseed_rows([reseed])
        with torch.inference_mode():
            row["flops"] = count_flops(lambda single=single: model.generate(**single, generation_config=gen),
                                       loaded.seams, timer)
        counted[key] = row["flops"]
    return rows


@functools.lru_cache(maxsize=32)
def _greedy(max_new_tokens: int, pad: int | None, eos: int | tuple[int, ...] | None, bos: int | None) -> Any:
    """The greedy generation config, one object per setting: `generate` works on its own deep copy."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                            eos_token_id=list(eos) if isinstance(eos, tuple) else eos, bos_token_id=bos)


def kept_for_rows(loaded: LoadedModel, inputs: Any, inst: Installation, b: int) -> list[dict[str, Any] | None]:
    """Each row's `kept` field (`prunebench/kept.py`): the visual tokens it kept and their layout."""
    state, layout_fn = inst.state, loaded.seams.visual_layout
    layouts, error = None, None
    if layout_fn is not None and state.prompt_image_mask is not None:
        try:
            layouts = split_layout(layout_fn(inputs), state.prompt_image_mask.sum(dim=1).tolist())
            error = None if layouts is not None else "the layout does not add up to the visual tokens"
        except Exception as err:  # noqa: BLE001 - a layout the family cannot give must not fail the sample
            error = f"{type(err).__name__}: {err}"
    fields = kept_fields(state, layouts, b)
    return [f if f is None or error is None else {**f, "layout_error": error} for f in fields]


_COUNT_FIELDS = ("n_new_tokens", "prompt_len", "llm_prompt_len", "n_visual_in", "n_visual_out", "n_visual_fixed",
                 "layer_avg", "llm_schedule", "vision_merge_schedule", "stages")


def flops_signature(single: Any, row: dict[str, Any]) -> str:
    """What a generate's FLOP count depends on: every input tensor's shape, the tokens generated and every count
    the stages reported (kept per stage and layer, merge schedules). FlopCounterMode counts by shapes alone, so
    two samples equal here count the same FLOPs."""
    shapes = {k: list(v.shape) for k, v in single.items() if isinstance(v, torch.Tensor)}
    grids = {k: single[k].tolist() for k in ("image_grid_thw", "video_grid_thw", "image_sizes") if k in single}
    return json.dumps({"shapes": shapes, "grids": grids, **{k: row.get(k) for k in _COUNT_FIELDS}},
                      sort_keys=True, default=str)


def _pixels_to(inputs: Any, dtype: torch.dtype) -> None:
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)


def _generated(tokens: torch.Tensor, eos: int | list[int] | None) -> torch.Tensor:
    """A row's generated tokens up to and including its first end-of-sequence token (what follows is the
    padding a batch adds to rows that finished early)."""
    if eos is None:
        return tokens
    stops = set(eos) if isinstance(eos, list) else {eos}
    for at, token in enumerate(tokens.tolist()):
        if token in stops:
            return tokens[: at + 1]
    return tokens
