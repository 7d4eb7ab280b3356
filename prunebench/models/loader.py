"""Load a model for a run (its family from `prunebench.families`): pretrained (hub id or local directory), random
weights from a shipped architecture config, or a checkpoint the project builds itself (`build: tiny_llava`,
`prunebench.fixtures`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunebench.checks import plain
from prunebench.errors import UserError
from prunebench.families import FAMILIES, Family
from prunebench.models.tiled_init import tiled_init
from prunebench.seams import Seams

ARCH_DIR = Path(__file__).resolve().parent / "arch"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    processor: Any
    seams: Seams
    device: torch.device
    dtype: torch.dtype
    weights: str  # "pretrained" | "random"
    source: str  # where the weights came from
    untrained: bool  # accuracy is noise
    inputs: InputCache = field(default_factory=lambda: InputCache(), repr=False, compare=False)

    @property
    def accuracy_meaningful(self) -> bool:
        return self.weights == "pretrained" and not self.untrained


class InputCache:
    """The processor's outputs per batch of items, for the life of the loaded model: the vanilla baseline, the
    method's job, its paired controls and every later job of a sweep process each sample once.

    Entries hold their items (so the ids in the key stay theirs) and the processor's CPU tensors. It fills up to
    `limit` bytes and then keeps what it has: every job scans the dataset in the same order, so a full cache still
    serves its first samples each time, where evicting the oldest would serve none. An entry a caller changed in
    place (a tensor's version moved) is dropped and processed again.

    The key is the items' ids and their preparation (`prep`: an input-stage method's per-item settings, e.g.
    downsample's resize target; () for the images as given), so inputs prepared one way never serve another.
    """

    def __init__(self, limit: int = 1 << 30) -> None:
        self.limit, self.bytes, self.hits, self.misses = limit, 0, 0, 0
        self._entries: dict[tuple[Any, ...], tuple[tuple[Any, ...], dict[str, Any], dict[str, int]]] = {}

    @staticmethod
    def key(batch: list[Any], prep: tuple[Any, ...] = ()) -> tuple[Any, ...]:
        return tuple(map(id, batch)), tuple(prep)

    def get(self, batch: list[Any], prep: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        key = self.key(batch, prep)
        entry = self._entries.get(key)
        if entry is not None and any(data._version != entry[2][k]
                                     for k, data in entry[1].items() if isinstance(data, torch.Tensor)):
            self._drop(key)
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry[1]

    def put(self, batch: list[Any], data: Mapping[str, Any], prep: tuple[Any, ...] = ()) -> None:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        size = sum(v.nbytes for v in tensors.values())
        if self.bytes + size > self.limit or any(v.device.type != "cpu" for v in tensors.values()):
            return
        self._entries[self.key(batch, prep)] = (tuple(batch), dict(data), {k: v._version for k, v in tensors.items()})
        self.bytes += size

    def _drop(self, key: tuple[Any, ...]) -> None:
        _, data, _ = self._entries.pop(key)
        self.bytes -= sum(v.nbytes for v in data.values() if isinstance(v, torch.Tensor))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"device must be one of: auto, cpu, cuda (got '{name}')")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in choices:
        raise UserError(f"dtype must be one of: auto, {', '.join(choices)} (got '{name}')")
    return choices[name]


def _local_path(path: str | None) -> Path | None:
    if not path:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


# The model a process keeps loaded for its next job (multirun jobs sharing a model config): one at a time.
_RESIDENT: dict[str, LoadedModel] = {}


def resident_model(cfg: Mapping[str, Any], device: torch.device) -> tuple[LoadedModel, bool]:
    """The loaded model for `cfg` on `device`, and whether it was already loaded by an earlier job of this process.

    A job leaves the model as it found it (every patch is undone on exit: the contract tests prove it), so the
    jobs of a sweep that share a model config share one load; a different config frees the old model first.
    """
    key = json.dumps({"model": plain(cfg), "device": str(device)}, sort_keys=True, default=str)
    if key in _RESIDENT:
        return _RESIDENT[key], True
    release_resident()
    loaded = load_model(cfg, device)
    _RESIDENT[key] = loaded
    return loaded, False


def release_resident() -> None:
    """Drop the kept model (its memory returns before the next one loads)."""
    if not _RESIDENT:
        return
    _RESIDENT.clear()
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_model(cfg: Mapping[str, Any], device: torch.device) -> LoadedModel:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per load: prunebench says what it loads
    family = FAMILIES.get(str(cfg.get("family", "llava")))
    weights = str(cfg.get("weights", "pretrained"))
    if weights not in ("pretrained", "random"):
        raise UserError(f"model.weights must be one of: pretrained, random (got '{weights}')")
    dtype = resolve_dtype(str(cfg.get("dtype", "auto")), device)
    attn = str(cfg.get("attn_implementation", "sdpa"))
    if weights == "random":
        model, processor, source = _random_weights(cfg, family, dtype, device, attn)
    else:
        model, processor, source = _pretrained(cfg, family, dtype, device, attn)
    model.eval()
    return LoadedModel(
        name=str(cfg["name"]), model=model, processor=processor, seams=family.seams(model), device=device,
        dtype=dtype, weights=weights, source=source, untrained=bool(cfg.get("untrained", False)),
    )


def _pretrained(cfg: Mapping[str, Any], family: Family, dtype: torch.dtype, device: torch.device, attn: str):
    from transformers import AutoProcessor

    local = _local_path(cfg.get("path"))
    if local is not None and cfg.get("build") and not (local / "config.json").exists():
        from prunebench.fixtures import build_checkpoint  # a checkpoint the project makes itself

        build_checkpoint(str(cfg["build"]), local, **dict(cfg.get("build_args") or {}))
    where = str(local) if local is not None else str(cfg.get("hub_id"))
    if local is not None and not local.exists():
        raise _missing_weights(cfg, where)
    if local is not None:
        refuse_pickle_only(local)
    try:
        load = family.load_processor or AutoProcessor.from_pretrained
        processor = load(where, **dict(cfg.get("processor_kwargs") or {}))
        model = family.model_class().from_pretrained(where, dtype=dtype, attn_implementation=attn,
                                                     device_map=_direct(device),
                                                     use_safetensors=True)  # never unpickle weights
    except (OSError, ValueError) as err:
        raise _missing_weights(cfg, where) from err
    return model.to(device), processor, where


def _direct(device: torch.device) -> dict[str, str] | None:
    """Load straight onto a GPU, in the configured dtype, where transformers can (it needs `accelerate` for a
    device map); else load on the CPU and move (`.to(device)`, a no-op on CPU)."""
    import importlib.util

    if device.type == "cuda" and importlib.util.find_spec("accelerate") is not None:
        return {"": str(device)}
    return None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle_only(folder: Path) -> None:
    """Weights load from safetensors only: a folder whose weights are pickles alone is one line, not an unpickling."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{folder} has pickle weights only ({', '.join(pickles[:3])}); prunebench loads safetensors "
                        f"only: convert them (save_pretrained(..., safe_serialization=True)) or point model.path elsewhere")


def free_bytes(device: torch.device) -> int:
    """Memory a new model can take on `device`: free CUDA memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def check_fits(family: Family, config: Any, dtype: torch.dtype, device: torch.device, arch: str) -> None:
    """Estimate a real-size build's weight bytes first (parameters counted on the meta device) and refuse in one
    line when they would not fit, naming the dtype that would."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in family.model_class()._from_config(config, dtype=dtype).parameters())
    free = free_bytes(device)
    need = n_params * dtype.itemsize
    if need <= 0.9 * free:  # headroom for activations and the KV cache
        return
    gib = 1024 ** 3
    smaller = [name for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16))
               if n_params * dt.itemsize <= 0.9 * free and dt.itemsize < dtype.itemsize]
    hint = f"model.dtype={smaller[0]} ({n_params * 2 / gib:.1f} GiB) would fit" if smaller else \
        "no dtype fits; use a smaller architecture or another device"
    raise UserError(f"model.weights=random: {arch} has {n_params / 1e9:.2f} B parameters, {need / gib:.1f} GiB in "
                    f"{str(dtype).removeprefix('torch.')}, but {free / gib:.1f} GiB is free on {device.type}; {hint}")


def decoder_layer_count(cfg: Mapping[str, Any]) -> int | None:
    """The LLM's decoder layer count from the model's config alone (no weights read), or None when the config is
    not at hand yet (a hub id, a tiny checkpoint still to build): then the check waits for the model."""
    if str(cfg.get("weights", "pretrained")) == "random":
        path = ARCH_DIR / f"{cfg.get('arch') or ''}.json"
    else:
        local = _local_path(cfg.get("path"))
        path = local / "config.json" if local is not None else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    text = data.get("text_config") or data.get("llm_config") or data
    layers = text.get("num_hidden_layers")
    return int(layers) if isinstance(layers, int) else None


def _missing_weights(cfg: Mapping[str, Any], where: str) -> UserError:
    return UserError(
        f"no weights for model '{cfg['name']}': looked for '{where}' (local directory or Hugging Face cache; "
        f"offline). Point model.path=/dir/with/hf/checkpoint, or use model.weights=random for latency work."
    )


def _random_weights(cfg: Mapping[str, Any], family: Family, dtype: torch.dtype, device: torch.device, attn: str):
    """The real architecture from a shipped config, random weights; a locally built processor."""
    from transformers import AutoConfig

    arch = str(cfg.get("arch") or "")
    arch_file = ARCH_DIR / f"{arch}.json"
    if not arch_file.exists():
        shipped = sorted(p.stem for p in ARCH_DIR.glob("*.json"))
        raise UserError(f"no shipped architecture '{arch}' for weights=random; valid: {', '.join(shipped)}")
    data = json.loads(arch_file.read_text())
    config = AutoConfig.for_model(**data)
    if family.local_processor is None:
        raise UserError(f"weights=random has no locally built processor for the {family.name} family yet")
    processor, overrides = family.local_processor(config)
    # The local tokenizer's special-token ids replace the checkpoint's: the weights are random anyway.
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = attn
    check_fits(family, config, dtype, device, arch)
    seed, how = int(cfg.get("init_seed", 0)), str(cfg.get("random_init", "tiled"))
    if how not in RANDOM_INITS:
        raise UserError(f"model.random_init must be one of: {', '.join(RANDOM_INITS)} (got '{how}')")
    torch.manual_seed(seed)
    with torch.device(device), tiled_init(seed) if how == "tiled" else nullcontext():
        model = family.model_class()._from_config(config, dtype=dtype)
    return model, processor, f"random weights ({RANDOM_INITS[how]}), architecture {arch_file.name}"


# model.random_init: how a weights=random build draws its weights (both: transformers' own _init_weights layout)
RANDOM_INITS = {"tiled": "tiled init: each initialiser's distribution, values from a seeded pool",
                "full": "transformers' full random init"}
