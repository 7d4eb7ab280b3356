"""Typed checks of every value a job is given, before anything loads.

Each option has a declared kind (int, float, bool, str, list, one of some choices) and, for numbers, a
range. A value of another kind is refused, never coerced: `seed=1.5` is not seed 1, `layer=2.5` is not
layer 2. Top-level options are declared here (`OPTIONS`); dataset, model and method parameters take the
kind of their default in the YAML (or the method's `defaults`), plus the ranges in `PARAM_RANGES`.
Every refusal is one `UserError` line naming the option, what it expects and the value given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunebench.errors import UserError


@dataclass(frozen=True)
class Kind:
    """What one option accepts: `type` is int | float | bool | str | list | any; `choices` for a str."""

    type: str
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive
    low_open: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()

    def expects(self) -> str:
        if self.choices:
            text = "one of: " + ", ".join(self.choices)
        else:
            text = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                    "list": "a list like [a, b]", "any": "a value"}[self.type]
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low:g}"
        return text + (" (or null)" if self.nullable else "")


OPTIONS: dict[str, Kind] = {
    "keep": Kind("float", 0.0, 1.0, low_open=True),
    "seed": Kind("int", 0),
    "limit": Kind("int", 1, nullable=True),
    "device": Kind("str"),  # auto | cpu | cuda | cuda:N, checked by models.loader.resolve_device
    "results_dir": Kind("str"),
    "baseline": Kind("bool"),
    "cpu_threads": Kind("int", 0, nullable=True),
    "warmup": Kind("int", 0),
    "batch_size": Kind("int", 1),
    "control": Kind("int", 0),
    "backend": Kind("str", nullable=True),  # a registered backend, checked by backends.backend_for
    "report": Kind("bool"),
    "wait": Kind("bool"),
}

# Ranges a parameter's default kind does not say (by parameter name, wherever it appears).
PARAM_RANGES: dict[str, Mapping[str, Kind]] = {
    "dataset": {"n": Kind("int", 1), "limit": Kind("int", 1, nullable=True), "image_size": Kind("int", 8),
                "max_new_tokens": Kind("int", 1), "nframe": Kind("int", 1, nullable=True),
                "fps": Kind("float", 0, low_open=True, nullable=True), "seed": Kind("int", 0),
                "subset_seed": Kind("int", 0), "families": Kind("list", nullable=True)},
    "model": {"dtype": Kind("str", choices=("auto", "float32", "float16", "bfloat16")),
              "weights": Kind("str", choices=("pretrained", "random")),
              "attn_implementation": Kind("str", choices=("sdpa", "eager")),
              "path": Kind("str", nullable=True), "init_seed": Kind("int", 0),
              "random_init": Kind("str", choices=("tiled", "full"))},
    "method": {"layer": Kind("int", 0, nullable=True)},
}


def kind_of(default: Any) -> Kind:
    """The kind a parameter takes from its default value (None: anything)."""
    if isinstance(default, bool):
        return Kind("bool")
    if isinstance(default, int):
        return Kind("int")
    if isinstance(default, float):
        return Kind("float")
    if isinstance(default, str):
        return Kind("str")
    if isinstance(default, Sequence):
        return Kind("list")
    return Kind("any", nullable=True)


def check_value(name: str, value: Any, kind: Kind) -> None:
    """Raise one line when `value` is not what `kind` accepts (an int passes as a float, nothing else is coerced)."""
    if value is None:
        if kind.nullable or kind.type == "any":
            return
        raise _bad(name, value, kind)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list | tuple),
        "any": True,
    }[kind.type]
    if ok and kind.choices:
        ok = value in kind.choices
    if ok and kind.type in ("int", "float"):
        ok = (kind.low is None or (value > kind.low if kind.low_open else value >= kind.low)) and \
             (kind.high is None or value <= kind.high)
    if not ok:
        raise _bad(name, value, kind)


def _bad(name: str, value: Any, kind: Kind) -> UserError:
    shown = "null" if value is None else repr(value) if isinstance(value, str) else str(value)
    return UserError(f"{name} must be {kind.expects()}, got {shown}")


def param_kind(group: str, key: str, default: Any, declared: Mapping[str, Kind] | None = None) -> Kind:
    """A dataset / model / method parameter's kind: its declared kind (the caller's, e.g. a method's own, else
    `PARAM_RANGES`), else its default's kind."""
    own = (declared or {}).get(key) or PARAM_RANGES.get(group, {}).get(key)
    if own is not None:
        return own
    kind = kind_of(default)
    # a dataset / model setting may be unset (model.path=null, dataset.md5=null); a method parameter may not
    return Kind(kind.type, nullable=default is None or group != "method")


def check_params(group: str, values: Mapping[str, Any], defaults: Mapping[str, Any], *,
                 prefix: str | None = None, declared: Mapping[str, Kind] | None = None) -> None:
    """Check every given parameter of a group against its declared kind or its default's kind (keys absent
    from defaults are the caller's to refuse; here they get their declared range, if any)."""
    for key, value in values.items():
        if key in defaults or key in PARAM_RANGES.get(group, {}):
            check_value(f"{prefix or group}.{key}", value, param_kind(group, key, defaults.get(key), declared))


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def yaml_defaults(group: str, name: str) -> dict[str, Any]:
    """The values of `configs/<group>/<name>.yaml` ({} for a name with no file: a custom dataset name)."""
    import yaml

    path = CONFIG_DIR / group / f"{name}.yaml"
    return dict(yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def check_options(cfg: Mapping[str, Any]) -> None:
    """The top-level options of a composed config."""
    for name, kind in OPTIONS.items():
        if name in cfg:
            check_value(name, cfg[name], kind)


def plain(params: Any) -> dict[str, Any]:
    """Hydra/OmegaConf containers -> plain dicts and lists (pipelines nest them; the record is JSON)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig | ListConfig) \
        else dict(params)
