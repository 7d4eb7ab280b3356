"""VLMEvalKit's own `run.py` with the pruned prunebench model registered as a VLMEvalKit model class.

    python -m prunebench.bridge.vlmeval_run --config pb.json --work-dir outputs     # run.py's own arguments
    python -m prunebench.bridge.vlmeval_run --data MME --model prunebench:llava15:fastv:0.111

`pb.json` is run.py's `--config` file; a model entry of class `PrunebenchVLM` takes prunebench's options
(`model`, `method`, `keep`, `seed`, `device`, any dotted override such as `"method.params.layer": 3`,
`predictions` for prunebench's per-sample rows):

    {"model": {"pb-fastv": {"class": "PrunebenchVLM", "model": "llava15", "method": "fastv", "keep": 0.111}},
     "data": {"MME": {"class": "ImageYORNDataset", "dataset": "MME"}}}

Without `--config`, a `--model` named `prunebench:<model>:<method>:<keep>` is registered in VLMEvalKit's
`supported_VLM` for the run. Each message is answered by `bridge.model.Session` (the built-in runner's chat
template, greedy, timed); VLMEvalKit's own run.py does the rest (prompts, inference, resume, scoring).
Run it with the backend venv's python (`scripts/setup_vlmeval.sh`).
"""

from __future__ import annotations

import functools
import runpy
import sys
from pathlib import Path
from typing import Any

from prunebench.errors import UserError

PREFIX = "prunebench:"


def model_class(api: Any) -> type:
    """`PrunebenchVLM`, a `vlmeval.vlm.base.BaseModel` over a pruned prunebench model that it loads itself."""
    from prunebench import methods  # noqa: F401  (registers the methods)
    from prunebench.bridge.model import Session
    from prunebench.checks import yaml_defaults
    from prunebench.jobs import Job, compose_job, model_for_job
    from prunebench.measure import instrument
    from prunebench.stages import install
    from prunebench.stages.inputs import refuse_outside_builtin
    from prunebench.timing import Timer

    class PrunebenchVLM(api.BaseModel):
        INTERLEAVE = True
        allowed_types = ["text", "image"]

        def __init__(self, model: str = "probe_llava", method: str = "divprune", keep: float = 0.111, seed: int = 0,
                     device: str = "auto", predictions: str = "prunebench_predictions.jsonl",
                     max_new_tokens: int = 16, **overrides: Any) -> None:
            super().__init__()
            cfg = compose_job({"model": model, "method": method, "keep": keep, "seed": seed, "device": device,
                               **overrides})
            job = Job.from_config(cfg)  # every value checked, one line each, before the model loads
            refuse_outside_builtin(job.method, "VLMEvalKit")
            loaded = model_for_job(job, cfg)
            timer = Timer(loaded.device)
            self._instrument = instrument(loaded.model, loaded.seams, timer)
            self._instrument.__enter__()
            self._install = install(loaded.seams, job.method, job.keep, seed=job.seed, timer=timer)
            inst = self._install.__enter__()
            sink = Path(predictions)
            sink.parent.mkdir(parents=True, exist_ok=True)
            self.default_new_tokens = int(max_new_tokens)
            self.session = Session(loaded, inst, timer, job.seed, self.default_new_tokens, sink, {},
                                   warmup=int(cfg.get("warmup", 1)))

        def generate_inner(self, message: Any, dataset: str | None = None) -> str:
            # the benchmark's answer length where prunebench ships its dataset config
            own = yaml_defaults("dataset", str(dataset)) if dataset else {}
            self.session.max_new_tokens = int(own.get("max_new_tokens", self.default_new_tokens))
            return self.session.answer(message)

    return PrunebenchVLM


def register(api: Any, models: list[str]) -> None:
    """`PrunebenchVLM` into `vlmeval.vlm` (run.py's `--config` looks classes up there) and every
    `prunebench:<model>:<method>:<keep>` name into `supported_VLM`."""
    import vlmeval.vlm
    from vlmeval.config import supported_VLM

    cls = model_class(api)
    vlmeval.vlm.PrunebenchVLM = cls
    for name in models:
        if name.startswith(PREFIX):
            parts = name[len(PREFIX):].split(":")
            if len(parts) != 3:
                raise UserError(f"--model {name}: expected {PREFIX}<model>:<method>:<keep>")
            model, method, keep = parts
            supported_VLM[name] = functools.partial(cls, model=model, method=method, keep=float(keep))


def _models(argv: list[str]) -> list[str]:
    out, taking = [], False
    for arg in argv:
        if arg.startswith("--"):
            taking = arg == "--model"
        elif taking:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from prunebench.bridge.isolate import vlmeval_api

    try:
        api = vlmeval_api()  # one line on how to install the backend when it is missing
        import vlmeval

        run_py = Path(vlmeval.__file__).resolve().parent.parent / "run.py"
        if not run_py.is_file():
            raise UserError(f"VLMEvalKit's run.py is not beside its package ({run_py}): install VLMEvalKit from a "
                            f"clone (scripts/setup_vlmeval.sh)")
        register(api, _models(argv))
    except UserError as err:
        print(f"prunebench: error: {err}", file=sys.stderr)
        return 2
    sys.argv = [str(run_py), *argv]
    runpy.run_path(str(run_py), run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
