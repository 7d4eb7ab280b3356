"""The pruned prunebench model as an lmms-eval `lmms` (simple, generation-only) model.

`--model_args` are prunebench's own options: `model=`, `method=`, `keep=`, `seed=`, `device=`, any other Hydra
override by its dotted name (`method.params.layer=3`, `model.dtype=bfloat16`), and `predictions=<file.jsonl>`
for prunebench's per-sample rows (timings, kept tokens, FLOPs, KV bytes). Each request is answered as the
built-in runner answers a sample: one user turn (images, then the task's text) through the family's chat
template, greedy, under the installed method, timed by `generation.generate_timed`; sample `doc_id` is reseeded
with seed * 1000003 + doc_id, so its random picks equal the built-in run's.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lmms_eval.api.model import lmms
from tqdm import tqdm

from prunebench import generation
from prunebench.jobs import Job, compose_job, model_for_job
from prunebench.measure import instrument
from prunebench.stages import install
from prunebench.stages.inputs import refuse_outside_builtin
from prunebench.timing import Timer


class PrunebenchLMM(lmms):
    def __init__(self, model: str = "probe_llava", method: str = "divprune", keep: float = 0.111, seed: int = 0,
                 device: str = "cpu", predictions: str | None = None, batch_size: int | str = 1,
                 **overrides: Any) -> None:
        super().__init__()
        if str(batch_size) not in ("1", "None"):
            raise ValueError("prunebench answers lmms-eval requests one at a time: use --batch_size 1")
        from prunebench import methods  # noqa: F401  (registers the methods)

        cfg = compose_job({"model": model, "method": method, "keep": keep, "seed": seed, "device": device,
                           **overrides})
        job = Job.from_config(cfg)  # every value checked, one line each, before the model loads
        refuse_outside_builtin(job.method, "lmms-eval")
        self._stack = ExitStack()
        loaded = model_for_job(job, cfg)
        timer = Timer(loaded.device)
        self._stack.enter_context(instrument(loaded.model, loaded.seams, timer))
        inst = self._stack.enter_context(install(loaded.seams, job.method, job.keep, seed=job.seed, timer=timer))
        self._attach(cfg, job, loaded, inst, timer, Path(predictions) if predictions else None, {})

    @classmethod
    def for_job(cls, cfg: Any, job: Job, loaded: Any, inst: Any, timer: Timer, sink: Path,
                known: dict[str, dict[str, Any]]) -> PrunebenchLMM:
        """The model over an already loaded, already pruned model (the `lmms_eval` backend): answers found in
        `known` (by `<task>:<doc_id>`, from an earlier, killed run) are returned, never generated twice."""
        lm = cls.__new__(cls)
        lmms.__init__(lm)
        lm._stack = None
        lm._attach(cfg, job, loaded, inst, timer, sink, known)
        return lm

    def _attach(self, cfg: Any, job: Job, loaded: Any, inst: Any, timer: Timer, sink: Path | None,
                known: dict[str, dict[str, Any]]) -> None:
        self.cfg, self.job, self.loaded, self.inst, self.timer = cfg, job, loaded, inst, timer
        self.sink, self.known = sink, known
        if sink is not None:
            sink.parent.mkdir(parents=True, exist_ok=True)
        self.warmup = int(cfg.get("warmup", 1))
        self.rows: list[dict[str, Any]] = []
        self.generated = 0

    def _inputs(self, visuals: list[Any], text: str) -> Any:
        processor = self.loaded.processor
        content = [{"type": "image"} for _ in visuals] + [{"type": "text", "text": text}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        media = {"images": visuals[0] if len(visuals) == 1 else list(visuals)} if visuals else {}
        return processor(text=prompt, return_tensors="pt", **media).to(self.loaded.device)

    def generate_until(self, requests: list[Any]) -> list[str]:
        answers = []
        for request in tqdm(requests, desc="prunebench", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            key = f"{task}:{doc_id}"
            if key in self.known:  # answered before a kill
                answers.append(str(self.known[key]["prediction"]))
                continue
            visuals = [v.convert("RGB") for v in doc_to_visual(self.task_dict[task][split][doc_id])]
            inputs = self._inputs(visuals, context)
            new_tokens = int(dict(gen_kwargs).get("max_new_tokens", 16))
            reseed = generation.sample_seed(self.job.seed, int(doc_id))
            for _ in range(self.warmup):  # untimed, as the runner's warm-up
                generation.generate_timed(self.loaded, inputs, self.inst, self.timer, reseed, new_tokens, flops=False)
            self.warmup = 0
            row = generation.generate_timed(self.loaded, inputs, self.inst, self.timer, reseed, new_tokens)
            text = _until(row.pop("text"), dict(gen_kwargs).get("until"))
            row = {"index": int(doc_id), "task": task, "key": key, "prediction": text, "error": None, **row}
            self.rows.append(row)
            self.known[key] = row
            self.generated += 1
            if self.sink is not None:
                with self.sink.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
            answers.append(text)
        return answers

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("prunebench measures pruned generation: use generate_until tasks")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("prunebench answers one round per request")

    def __del__(self) -> None:
        stack = getattr(self, "_stack", None)
        if stack is not None:
            stack.close()  # every hook removed, every class restored


def _until(text: str, until: Any) -> str:
    """The answer cut at the first of the task's stop strings (lmms-eval's `until`)."""
    for stop in [until] if isinstance(until, str) else list(until or []):
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()
