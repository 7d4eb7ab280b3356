# prunebench — `make demo` runs the embedded default and prints the table; `make test` runs the tests.
# Both set everything up on a fresh machine (virtualenv, CPU torch wheel, the package).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.prunebench-setup
ARGS   ?=
# one method per family of ideas; the probe's 4-layer encoder cannot merge down to 0.111 (evoprune, tome)
METHODS ?= random_pre,pooling_pre,divprune,fastervlm,random_intra,fastv,dart
KEEPS   ?= 0.333,0.222,0.111

.PHONY: setup demo test sweep report gallery bench bench-throughput bench-sweep bench-selection gpu-check lint clean vlmeval-check vlmeval-test lmms-setup lmms-test probe probe-qwen probe-internvl

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0   # the CPU wheel; a loose pin pulls the CUDA build
	$(BIN)/python -m pip install -q -e ".[dev,plot,slurm,report]"
	touch $(STAMP)

demo: setup          ## default job (trained probe LLaVA, DivPrune keep 0.111, probe suite) and its report
	$(BIN)/python -m prunebench $(ARGS)

test: setup          ## the test suite (what CI runs)
	$(BIN)/python -m pytest -q

sweep: setup         ## every method x keep on the default model and dataset (resumable)
	$(BIN)/python -m prunebench -m method=$(METHODS) keep=$(KEEPS) report=false $(ARGS)
	$(BIN)/python -m prunebench.report results --plot results/relative_accuracy.png

report: setup
	$(BIN)/python -m prunebench.report results

gallery: setup       ## the README's gallery from the probe: overlays, position bias, Pareto front, table (docs/gallery/)
	PYTHON=$(BIN)/python bash scripts/gallery.sh

bench: setup         ## LLM-prefill time vs keep on a mid-size random LLaVA (CPU, 1 thread)
	$(BIN)/python scripts/bench_prefill.py $(ARGS)

bench-sweep: setup   ## a 6-job multirun's wall / one job's, the default job's harness overhead and its own share over a plain-HF floor (CPU, 1 thread)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/bench_sweep.py $(ARGS)

bench-selection: setup  ## every select method's time at 576 / 2,880 / 10,816 tokens beside the similarity matrix
	OMP_NUM_THREADS=1 $(BIN)/python scripts/bench_selection.py $(ARGS)

gpu-check: setup     ## the prepared GPU check (<= 8 min on one GPU) -> docs/gpu_check.md; DRY=1: tiny models on CPU
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh $(if $(DRY),--dry --out results/gpu_check_dry.md,) $(ARGS)

bench-throughput: setup  ## samples/s and tokens/s at batch 1 / 4 / 16, vanilla vs pruned (CPU, 1 thread; ~20 min)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/bench_throughput.py $(ARGS)

# The committed probes' recipes (their cards): the LLaVA probe ran the script's defaults; the Qwen2.5-VL and
# InternVL3 probes, half of A-D and 1200 / 800 E steps (CPU time), the InternVL3 one with length jitter. ARGS come
# last and override (ARGS="--steps-a 300 ..." for the full recipe).
QWEN_RECIPE     ?= --steps-a 150 --steps-b 400 --steps-c 400 --steps-d 400 --steps-e 1200
INTERNVL_RECIPE ?= --steps-a 150 --steps-b 400 --steps-c 400 --steps-d 400 --steps-e 800 --jitter 0.5

probe: setup         ## retrain the probe LLaVA (issue 6; ~75 min on 1 CPU thread), install it, measure pruning per family
	$(BIN)/python scripts/train_probe.py --out runs/probe_llava $(ARGS)
	rm -rf checkpoints/probe_llava && cp -r runs/probe_llava/final checkpoints/probe_llava
	$(BIN)/python scripts/measure_probe.py

probe-qwen: setup    ## the same for the Qwen2.5-VL-architecture probe (its committed recipe; card: wall time)
	$(BIN)/python scripts/train_probe.py --family qwen2_5_vl --out runs/probe_qwen25vl $(QWEN_RECIPE) $(ARGS)
	rm -rf checkpoints/probe_qwen25vl && cp -r runs/probe_qwen25vl/final checkpoints/probe_qwen25vl
	$(BIN)/python scripts/measure_probe.py --model probe_qwen25vl

probe-internvl: setup  ## the same for the InternVL3-architecture probe (its committed recipe; card: wall time)
	$(BIN)/python scripts/train_probe.py --family internvl --out runs/probe_internvl3 $(INTERNVL_RECIPE) $(ARGS)
	rm -rf checkpoints/probe_internvl3 && cp -r runs/probe_internvl3/final checkpoints/probe_internvl3
	$(BIN)/python scripts/measure_probe.py --model probe_internvl3

# Optional VLMEvalKit backend (README: "VLMEvalKit backend"): its own venv, VLMEVAL_PYTHON=<venv>/bin/python
VLMEVAL_PYTHON ?= $(BIN)/python

vlmeval-check:       ## is the VLMEvalKit backend importable from VLMEVAL_PYTHON?
	$(VLMEVAL_PYTHON) -c "import sys; from prunebench.bridge.isolate import vlmeval_missing_reason as why; \
	  m = why(); print(m or 'VLMEvalKit backend: importable'); sys.exit(1 if m else 0)"

vlmeval-test: vlmeval-check  ## the bridge's end-to-end tests in the backend's venv
	$(VLMEVAL_PYTHON) -m pytest -q tests/test_bridge_pure.py tests/test_bridge_vlmeval.py tests/test_bridge_video.py

# Optional lmms-eval (README: "lmms-eval"): its own venv at LMMS_VENV, prunebench installed there as the
# `--model prunebench` entry point. lmms-eval 0.7.3 imports `filelock._api`, gone in filelock 3.20.
LMMS_VENV ?= ../lmms-venv

lmms-setup:          ## a venv with lmms-eval 0.7.3 and prunebench (CPU torch), for lmms-test and lmms-eval's CLI
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LMMS_VENV)/bin/python -m pip install -q -e ".[lmms,dev]" "filelock<3.20"

lmms-test:           ## lmms-eval's own CLI on the pruned model (probe task) == the built-in run, in LMMS_VENV
	$(LMMS_VENV)/bin/python -m pytest -q tests/test_lmms.py

lint: setup
	$(BIN)/ruff check prunebench tests scripts

clean:
	rm -rf results/*/ .pytest_cache .ruff_cache
	find checkpoints -mindepth 1 -maxdepth 1 ! -name probe_llava ! -name probe_qwen25vl ! -name probe_internvl3 -exec rm -rf {} + 2>/dev/null || true  # the trained probes are committed
