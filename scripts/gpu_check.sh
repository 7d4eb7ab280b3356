#!/usr/bin/env bash
# The prepared GPU check (make gpu-check): one short command on the GPU machine, at most ~8 minutes.
#   bash scripts/gpu_check.sh          real-size random-weight bf16 builds on the GPU -> docs/gpu_check.md
#   bash scripts/gpu_check.sh --dry    the same path on CPU with the tiny checkpoints (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout 480 "$PY" scripts/gpu_check.py "$@"
