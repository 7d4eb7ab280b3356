"""Checks the bridge runs before the model loads, and what keeps VLMEvalKit off the user's files.

- `check_vlmeval_config`: every VLMEvalKit dataset parameter against its type and range (one line).
- `resolve_owner` / `check_scorer`: the VLMEvalKit class a dataset name routes to must have a scorer;
  a name VLMEvalKit does not know, without `+dataset.base=`, would be built as a custom set whose
  `evaluate` raises `NotImplementedError` (or is the base class's no-op) after every row is answered.
- `keyed_img_root` / `image_cache`: VLMEvalKit's `ImageBaseDataset.dump_image` decodes each base64 image
  to `<LMUData>/images/<img_root_map(name)>/<image_path or index>.png` and reuses any readable file
  already there (`read_ok`), whatever TSV it came from. The bridge points each dataset object's
  `img_root` at a folder keyed on the TSV's MD5, so another TSV under the same name never reuses them.
- `no_download`: VLMEvalKit's `prepare_tsv` downloads over `<LMUData>/<name>.tsv` when its MD5 is not
  the class's `DATASET_MD5[name]`; the bridge registers the local file's MD5 for every name it builds,
  and this guard refuses any download onto an existing file while the dataset is built.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import json
import os
import re
import textwrap
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prunebench.bridge.isolate import scoped_env
from prunebench.errors import UserError

MARKER = "prunebench_tsv.json"
LOCALIZE_BYTES = 1 << 30  # VLMEvalKit's prepare_tsv localizes a TSV over 1 GB into images/<name>/ + _local.tsv
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


# --------------------------------------------------------------------------------------- typed checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_map(v: Any) -> bool:
    return isinstance(v, Mapping) or (hasattr(v, "items") and hasattr(v, "keys") and not isinstance(v, str))


def _is_list(v: Any) -> bool:
    return isinstance(v, list | tuple) or type(v).__name__ == "ListConfig"


# key -> (accepts, expected) ; None is accepted only where the expectation says "or null"
_SPECS: dict[str, tuple[Any, str]] = {
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "base": (lambda v: v is None or (isinstance(v, str) and v != ""), "a VLMEvalKit dataset name or null"),
    "kind": (lambda v: v == "vlmeval", "vlmeval"),
    "modality": (lambda v: v in ("image", "video"), "one of image, video"),
    "scorer": (lambda v: v in ("vlmeval", "shapes"), "one of vlmeval, shapes"),
    "export": (lambda v: v in (None, "shapes", "probe"), "one of shapes, probe or null"),
    "export_args": (lambda v: v is None or _is_map(v), "a mapping or null"),
    "url": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "md5": (lambda v: v is None or (isinstance(v, str) and bool(_MD5.match(v))), "a 32-hex-digit MD5 string or null"),
    "data_dir": (lambda v: v is None or (isinstance(v, str) and v != ""), "a folder path or null"),
    "limit": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null"),
    "subset_seed": (_is_int, "an integer"),
    "min_limit": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null"),
    "group_by": (lambda v: v is None or (isinstance(v, str) and v != ""), "a column name, index_mod:<N> or null"),
    "stratify": (lambda v: v is None or (isinstance(v, str) and v != ""), "a column name or null"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "score": (lambda v: v is None or _is_map(v), "a mapping"),
    "judge": (lambda v: v is None or _is_map(v), "a mapping or null"),
    "nframe": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 1 (0 or null: use fps)"),
    "fps": (lambda v: v is None or (_is_num(v) and (v > 0 or v == -1)), "a number > 0 (null or -1: use nframe)"),
    "video_llm": (lambda v: isinstance(v, bool), "true or false"),
}

_EXPORT_SPECS: dict[str, tuple[Any, str]] = {
    "n": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "seed": (_is_int, "an integer"),
    "image_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "families": (lambda v: v is None or (_is_list(v) and all(isinstance(x, str) for x in v)),
                 "a list of family names or null"),
}

_JUDGE_SPECS: dict[str, tuple[Any, str]] = {
    "model": (lambda v: isinstance(v, str) and v != "", "a judge model name"),
    "api_base": (lambda v: v is None or isinstance(v, str), "an OpenAI-compatible URL or null"),
    "key_env": (lambda v: v is None or (isinstance(v, str) and v != ""), "an environment variable name or null"),
}


def _check(prefix: str, cfg: Mapping[str, Any], specs: Mapping[str, tuple[Any, str]], strict: bool) -> None:
    for key in cfg:
        if key not in specs:
            if strict:
                close = difflib.get_close_matches(str(key), list(specs), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise UserError(f"unknown option {prefix}{key}{hint}; valid: {', '.join(sorted(specs))}")
            continue
        accepts, expected = specs[key]
        value = cfg[key]
        if not accepts(value):
            raise UserError(f"{prefix}{key} must be {expected}, got {value!r}")


def check_vlmeval_config(dataset_cfg: Mapping[str, Any]) -> None:
    """Every VLMEvalKit dataset parameter against its declared type and range; one UserError line.

    A float where an integer is expected is refused (not truncated), a bool is not an integer, and
    an unknown key (a typo such as `+dataset.limt=5`) is refused with the valid keys.
    """
    _check("dataset.", dataset_cfg, _SPECS, strict=True)
    if "name" not in dataset_cfg:
        raise UserError("dataset.name must be a non-empty string, got nothing")
    if _is_map(dataset_cfg.get("export_args")):
        _check("dataset.export_args.", dataset_cfg["export_args"], _EXPORT_SPECS, strict=True)
    if _is_map(dataset_cfg.get("judge")):
        _check("dataset.judge.", dataset_cfg["judge"], _JUDGE_SPECS, strict=False)


def check_limit(value: Any, option: str) -> int | None:
    """A sample limit: an integer >= 1 or null (a float or a string is refused, not truncated)."""
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise UserError(f"{option} must be an integer >= 1 or null, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------ scorer checks


def resolve_owner(api: Any, name: str) -> Any | None:
    """The class VLMEvalKit's `build_dataset(name)` instantiates (None: it would guess a custom class)."""
    return next((c for c in api.dataset_classes if name in c.supported_datasets()), None)


def _raises_not_implemented(fn: Any) -> bool:
    """True when a method's body is only `pass`, `...` or `raise NotImplementedError` (docstring aside)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                         and isinstance(s.value.value, str))]
    if not body:
        return True
    if len(body) != 1:
        return False
    stmt = body[0]
    if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def has_scorer(cls: Any) -> bool:
    evaluate = getattr(cls, "evaluate", None)
    return evaluate is not None and not _raises_not_implemented(evaluate)


def _guess_base(api: Any, dcfg: Mapping[str, Any]) -> str:
    """The VLMEvalKit name the user most likely copied: the YAML's download file, else the closest name."""
    known = [n for c in api.dataset_classes for n in c.supported_datasets()]
    stem = Path(str(dcfg.get("url") or "")).stem
    if stem and stem in known:
        return stem
    close = difflib.get_close_matches(str(dcfg["name"]), known, n=1, cutoff=0.3)
    return close[0] if close else "<VLMEvalKit name>"


def check_scorer(api: Any, dcfg: Mapping[str, Any], name: str, base: str | None) -> Any:
    """The class whose `evaluate` will score `name` (`base`'s when a custom name is registered on it),
    or one UserError line naming what to set; runs before the model loads."""
    target = base if base is not None else name
    owner = resolve_owner(api, target)
    if owner is None:
        guess = _guess_base(api, dcfg)
        if base is not None and base != name:
            raise UserError(f"dataset.base={base} is not a dataset VLMEvalKit knows in this version; valid: a "
                            f"name from its DATASET_URL tables (e.g. +dataset.base={guess})")
        raise UserError(f"dataset {name} is not a dataset VLMEvalKit knows, so it would build a custom dataset "
                        f"with no scorer for it and fail after every row is answered; set "
                        f"+dataset.base={guess} (the VLMEvalKit dataset whose format and scorer it uses)")
    if not has_scorer(owner):
        raise UserError(f"dataset {name}: VLMEvalKit's {owner.__name__} (for {target}) has no evaluate; valid: "
                        f"+dataset.base=<a VLMEvalKit dataset with a scorer>")
    return owner


# ------------------------------------------------------------------------------------- image cache


def keyed_img_root(root: Path, folder: str, md5: str) -> Path:
    """`<root>/images/<folder>.<md5[:12]>`: decoded images of one TSV content only."""
    return root / "images" / f"{folder}.{md5[:12]}"


def write_marker(folder: Path, tsv_path: Path, md5: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    blob = json.dumps({"tsv": str(tsv_path), "md5": md5}, sort_keys=True)
    if not marker.is_file() or marker.read_text() != blob:
        tmp = folder / f".{MARKER}.{os.getpid()}.tmp"
        tmp.write_text(blob)
        os.replace(tmp, marker)


def read_marker(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / MARKER).read_text())["md5"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_localized(root: Path, name: str, tsv_path: Path, md5: str) -> bool:
    """A TSV over 1 GB: VLMEvalKit decodes it once into `images/<name>/` + `<name>_local.tsv` and reuses
    both. True: (re)localize now (nothing there yet); a folder from another content is one line."""
    if tsv_path.stat().st_size <= LOCALIZE_BYTES:
        return False
    folder, local = root / "images" / name, root / f"{name}_local.tsv"
    if read_marker(folder) == md5 and local.is_file():
        return False
    if folder.exists() and any(p.name != MARKER for p in folder.iterdir()):
        raise UserError(f"dataset {name}: {folder} holds images VLMEvalKit decoded from another {tsv_path.name} "
                        f"(or from an unrecorded one) and would reuse them; remove {folder} and {local}")
    return True


@contextmanager
def image_cache(root: Path, name: str, tsv_path: Path, md5: str) -> Iterator[None]:
    """Around the dataset build: FORCE_LOCAL when a >1 GB TSV must be localized afresh, then the marker."""
    fresh = check_localized(root, name, tsv_path, md5)
    with scoped_env("FORCE_LOCAL", "1" if fresh else None):
        yield
    if fresh:
        write_marker(root / "images" / name, tsv_path, md5)


def key_images(dataset: Any, root: Path, name: str, tsv_path: Path, md5: str) -> None:
    """Point a built dataset's `img_root` at the folder of this TSV content (base64 images only: a TSV
    of `image_path`s names the user's own files relative to VLMEvalKit's folder, which stays)."""
    if getattr(dataset, "meta_only", True) or not hasattr(dataset, "img_root"):
        return
    folder = Path(str(dataset.img_root)).name or name
    keyed = keyed_img_root(root, folder, md5)
    write_marker(keyed, tsv_path, md5)
    dataset.img_root = str(keyed)


# ------------------------------------------------------------------------------------- no downloads


@contextmanager
def no_download(api_modules: Iterator[Any] | list[Any]) -> Iterator[None]:
    """While VLMEvalKit builds a dataset, `download_file` onto an existing file is one UserError line."""
    patched: list[tuple[Any, Any]] = []

    def make(real: Any) -> Any:
        def guarded(url: str, filename: str | None = None, *args: Any, **kwargs: Any) -> Any:
            target = filename if filename is not None else url.split("/")[-1]
            if target and os.path.exists(target):
                raise UserError(f"VLMEvalKit was about to download {url} over {target} (its MD5 is not the one "
                                f"VLMEvalKit expects); the bridge never replaces a local file: check the file "
                                f"or set dataset.md5=<its MD5>")
            return real(url, filename, *args, **kwargs)

        guarded.__wrapped__ = real  # type: ignore[attr-defined]
        return guarded

    for module in api_modules:
        real = getattr(module, "download_file", None)
        if callable(real) and not hasattr(real, "__wrapped__"):
            patched.append((module, real))
            module.download_file = make(real)
    try:
        yield
    finally:
        for module, real in patched:
            module.download_file = real
