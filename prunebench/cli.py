"""Command line: `python -m prunebench [hydra overrides]`.

Thin on purpose: compose the config, run the job (and its vanilla baseline), print the table.
User mistakes become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from prunebench.errors import UserError, unknown_choice

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("model", "method", "dataset")


def check_group_choices(argv: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Reject an unknown model / method / dataset before Hydra prints its multi-line error."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        choices = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
        for name in _sweep_values(value):
            if name not in choices:
                raise unknown_choice(key, name, choices)


def check_overrides(argv: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """One-line errors for unknown options and parameters, and typed checks of every value given (each value
    of a sweep), before Hydra composes anything and before any model loads."""
    import yaml

    from prunebench.checks import OPTIONS, check_params, check_value, yaml_defaults
    from prunebench.methods import resolve_method

    top = yaml.safe_load((config_dir / "config.yaml").read_text())
    options = sorted(k for k in top if k not in ("defaults", "hydra"))
    defaults = {next(iter(d)): d[next(iter(d))] for d in top["defaults"] if isinstance(d, dict)}
    overrides = [a.partition("=") for a in argv if "=" in a and not a.startswith(("+", "~", "hydra"))]
    parsed = _parse(argv)
    chosen = {g: [n for k, v in parsed.items() if k == g for n in v] or [defaults[g]] for g in GROUPS}
    for key, values in parsed.items():
        head, _, rest = key.partition(".")
        if key in OPTIONS:
            for value in values:
                check_value(key, value, OPTIONS[key])
        elif "." not in key and head not in GROUPS and head not in options:
            raise unknown_choice("option", key, options)
        elif key.startswith("method.params."):
            for name in chosen["method"]:
                for value in values:
                    resolve_method(name, {key.split(".", 2)[2]: value})
        elif head in ("dataset", "model") and rest and "." not in rest:
            for name in chosen[head]:
                known = yaml_defaults(head, name)
                if rest not in known:
                    raise UserError(f"{head} '{name}' has no setting '{rest}' (add it with +{key}=...); "
                                    f"valid: {', '.join(sorted(known))}")
                for value in values:
                    check_params(head, {rest: value}, known)
    _check_pipeline(overrides, chosen["method"], float(top["keep"]))


def _parse(argv: list[str]) -> dict[str, list[Any]]:
    """Hydra's own parse of the plain `key=value` overrides -> {key: [each value, sweeps expanded]}
    (typed as Hydra types them: `1.5` a float, `abc` a string); `+`/`~` overrides are Hydra's to check."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    plain = [a for a in argv if "=" in a and not a.startswith(("+", "~", "hydra", "-"))]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except HydraException:
        return {}  # Hydra prints its own grammar error
    out: dict[str, list[Any]] = {}
    for o in parsed:
        values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        out[o.key_or_group] = values
    return out


def _check_pipeline(overrides: list[tuple[str, str, str]], names: list[str], default_keep: float) -> None:
    """`method.params.stages=[...]` of `method=compose`: stage names, params and keeps, one line each."""
    import yaml

    from prunebench.methods.compose import plan_stages

    stages = [v for k, _, v in overrides if k == "method.params.stages"]
    if not stages or "compose" not in names:
        return
    try:
        value = yaml.safe_load(stages[-1])
    except yaml.YAMLError:
        raise UserError("compose: method.params.stages must be a list like "
                        "[{name: random_pre, keep: 0.333}, {name: fastv, keep: 0.333}]") from None
    keeps = [v for k, _, v in overrides if k == "keep"]
    for keep in _sweep_values(keeps[-1]) if keeps else [str(default_keep)]:
        try:
            fraction = float(keep)
        except ValueError:  # not a number: the job itself reports it
            continue
        plan_stages(value, fraction)


def _sweep_values(value: str) -> list[str]:
    """`a,b` or `choice(a,b)` -> [a, b]; anything fancier is left to Hydra."""
    value = value.strip()
    if value.startswith("choice(") and value.endswith(")"):
        value = value[len("choice(") : -1]
    return [v.strip() for v in value.split(",") if v.strip()]


def force_method_params(argv: list[str]) -> list[str]:
    """In a multirun, Hydra first composes the config without the swept `method=a,b` choice, so a
    `method.params.x=` override fails there ("Key 'x' is not in struct") though every swept method
    has `x` (checked by `check_overrides`). Force-adding it (`++`) lets each job compose."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    return [f"++{a}" if a.startswith("method.params.") and "=" in a else a for a in argv]


def models_first(argv: list[str]) -> list[str]:
    """Multirun: the `model=` override first, so the sweep varies the model slowest (Hydra's basic sweeper takes
    the product in command-line order) and each model loads once (`models.loader.resident_model`)."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    models = [a for a in argv if a.startswith("model=")]
    rest = [a for a in argv if not a.startswith("model=")]
    first = next((i for i, a in enumerate(rest) if "=" in a and not a.startswith("-")), len(rest))
    return rest[:first] + models + rest[first:]  # Hydra's flags (and their values) stay where they were


def grid_jobs(cfg: Any) -> list[Any]:
    """The jobs of `grid.method` x `grid.keep` (each a method config from configs/method/), or this job alone."""
    from omegaconf import OmegaConf, open_dict

    from prunebench.checks import OPTIONS, check_value

    grid = cfg.get("grid") or {}
    methods, keeps = grid.get("method"), grid.get("keep")
    if methods is None and keeps is None:
        return [cfg]
    names = [cfg.method.name] if methods is None else [str(m) for m in _as_list(methods)]
    check_group_choices([f"method={','.join(names)}"])
    jobs = []
    for name in names:
        for keep in [cfg.keep] if keeps is None else _as_list(keeps):
            check_value("grid.keep", keep, OPTIONS["keep"])
            job = cfg.copy()
            with open_dict(job):
                if name != cfg.method.name:
                    job.method = OmegaConf.load(CONFIG_DIR / "method" / f"{name}.yaml")
                job.keep = float(keep)
                job.grid = {"method": None, "keep": None}
            jobs.append(job)
    return jobs


def _as_list(value: Any) -> list[Any]:
    from omegaconf import ListConfig

    return list(value) if isinstance(value, list | tuple | ListConfig) else [value]


def run_with_baseline(cfg: Any) -> None:
    from omegaconf import OmegaConf, open_dict

    from prunebench import methods  # noqa: F401  (registers methods)
    from prunebench.backends import backend_for
    from prunebench.runner import run

    backend = backend_for(cfg)  # the backend runs this dataset at this batch size
    if backend.check is not None:
        backend.check(cfg)  # every value of the job checked before the baseline's model loads
    if cfg.baseline and cfg.method.name != "vanilla":
        base = cfg.copy()
        with open_dict(base):
            base.method = OmegaConf.load(CONFIG_DIR / "method" / "vanilla.yaml")
            base.keep = 1.0
        run(base, wait=True)  # jobs sharing a baseline queue for it; the first runs it, the others reuse it
    path = run(cfg)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 writes the record and reports
        return
    print(f"[prunebench] record: {path}", file=sys.stderr)
    if cfg.report:
        from prunebench.record import load_record
        from prunebench.report import collect, render

        job = load_record(path)  # its dataset may be a subset's name (VLMEvalKit backend)
        records = [r for r in collect(Path(str(cfg.results_dir)))
                   if (r.model, r.dataset, r.limit) == (job.model, job.dataset, job.limit)]
        print(render(records))


def main() -> None:
    try:
        check_group_choices(sys.argv[1:])
        check_overrides(sys.argv[1:])
    except UserError as err:
        print(f"prunebench: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv[1:] = models_first(force_method_params(sys.argv[1:]))
    multirun = bool({"-m", "--multirun"} & set(sys.argv[1:]))
    refused: list[str] = []
    import hydra

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def _task(cfg: Any) -> None:
        try:
            jobs = grid_jobs(cfg)
        except UserError as err:
            print(f"prunebench: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        for job in jobs:
            try:
                run_with_baseline(job)
            except UserError as err:
                print(f"prunebench: error: {err}", file=sys.stderr)
                if not multirun and len(jobs) == 1:
                    raise SystemExit(2) from None
                # one job the model cannot run (e.g. more merges than its encoder allows) does not stop a sweep
                refused.append(f"{job.method.name} keep={job.keep}: {err}")

    try:
        _task()
    except KeyboardInterrupt as err:  # Ctrl-C: what is saved, and how to go on; no traceback
        print(f"prunebench: {getattr(err, 'message', 'interrupted; rerun the same command to resume')}",
              file=sys.stderr)
        raise SystemExit(130) from None
    if refused:
        print(f"prunebench: {len(refused)} job(s) refused, the others ran:", file=sys.stderr)
        for line in refused:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(2)
