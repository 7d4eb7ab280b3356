"""prunebench as an lmms-eval model: `python -m lmms_eval eval --model prunebench --model_args model=...,method=...`.

lmms-eval (optional, `pip install "prunebench[lmms]"` in its own venv) finds the model through the entry point
`lmms_eval.models: prunebench = prunebench.lmms:manifest` (pyproject.toml); nothing here imports lmms-eval until
lmms-eval asks for the class. `task.py` exports the built-in probe suite as an lmms-eval task over local files.
"""

from __future__ import annotations

from typing import Any


def manifest() -> Any:
    """The entry point's payload: lmms-eval's model manifest for `--model prunebench`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="prunebench", simple_class_path="prunebench.lmms.model.PrunebenchLMM")
