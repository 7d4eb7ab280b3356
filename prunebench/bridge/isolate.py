"""Import VLMEvalKit without letting its import side effects leak into prunebench.

`import vlmeval` turns off SSL certificate verification for the process and configures the root
logger (`vlmeval/__init__.py`), loads a `.env` into `os.environ`; `vlmeval.vlm` disables autograd
globally and seeds torch (`vlmeval/vlm/__init__.py`); dataset modules add warning filters. Every
one of those is snapshotted before the import and put back after it (and after each bridge call).
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from prunebench.errors import UserError

INSTALL_HINT = ("VLMEvalKit is not importable; install the optional backend (README 'VLMEvalKit backend': "
                "scripts/setup_vlmeval.sh, "
                "a clone outside the repo, `pip install -e <clone> --no-deps`) or use a built-in dataset "
                "such as dataset=shapes")


@dataclass
class ProcessState:
    """What VLMEvalKit's import changes, as it was."""

    grad: bool
    torch_rng: torch.Tensor
    py_rng: tuple[Any, ...]
    ssl_context: Any
    root_level: int
    root_handlers: list[logging.Handler]
    warning_filters: list[Any]
    environ: dict[str, str]


def snapshot() -> ProcessState:
    root = logging.getLogger()
    return ProcessState(grad=torch.is_grad_enabled(), torch_rng=torch.get_rng_state(), py_rng=random.getstate(),
                        ssl_context=ssl._create_default_https_context, root_level=root.level,
                        root_handlers=list(root.handlers), warning_filters=list(warnings.filters),
                        environ=dict(os.environ))


def restore(state: ProcessState) -> None:
    torch.set_grad_enabled(state.grad)
    torch.set_rng_state(state.torch_rng)
    random.setstate(state.py_rng)
    ssl._create_default_https_context = state.ssl_context
    root = logging.getLogger()
    root.setLevel(state.root_level)
    root.handlers[:] = state.root_handlers
    warnings.filters[:] = state.warning_filters
    for key in set(os.environ) - set(state.environ):
        del os.environ[key]
    os.environ.update(state.environ)


@contextmanager
def scoped_env(name: str, value: str | None) -> Iterator[None]:
    """$name set to `value` inside the block (None: left as it is), then exactly as it was before."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextmanager
def contained() -> Iterator[None]:
    """Run VLMEvalKit code; whatever global state it changes is undone on exit."""
    state = snapshot()
    try:
        yield
    finally:
        restore(state)


_API: SimpleNamespace | None = None
# VLMEvalKit's `load_env` logs this as an error on every import when its clone has no `.env` (API keys for LLM
# judges): not an error for prunebench, whose judge check names the variables a judged dataset needs.
NO_ENV_FILE = "Did not detect the .env file"


class _DropNoEnvFile(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NO_ENV_FILE)


@contextmanager
def without_env_file_error() -> Iterator[None]:
    """Drop VLMEvalKit's missing-`.env` error line while it imports (a logger's filter runs before any handler,
    so the line is dropped whichever handlers its `basicConfig` adds)."""
    drop = _DropNoEnvFile()
    loggers = [logging.getLogger(), logging.getLogger("LOAD_ENV")]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def vlmeval_api() -> SimpleNamespace:
    """The VLMEvalKit entry points the bridge uses, imported once with side effects undone.

    Raises UserError (one line, how to install) when VLMEvalKit or one of its dependencies is missing.
    """
    global _API
    if _API is None:
        with contained(), without_env_file_error():
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
            try:
                from vlmeval import inference
                from vlmeval.dataset import DATASET_CLASSES, build_dataset
                from vlmeval.inference_video import infer_data_job_video
                from vlmeval.smp import get_pred_file_path, load
                from vlmeval.vlm.base import BaseModel
            except Exception as err:  # ImportError, or a broken torchvision raising RuntimeError
                raise UserError(f"{INSTALL_HINT} ({type(err).__name__}: {err})") from None
        _API = SimpleNamespace(BaseModel=BaseModel, infer_data_job=inference.infer_data_job,
                               infer_data_job_video=infer_data_job_video,
                               build_dataset=build_dataset, dataset_classes=list(DATASET_CLASSES),
                               get_pred_file_path=get_pred_file_path, load=load)
    return _API


def vlmeval_missing_reason() -> str | None:
    """None when VLMEvalKit imports, else why not (for pytest skips)."""
    try:
        vlmeval_api()
    except UserError as err:
        return str(err)
    return None
