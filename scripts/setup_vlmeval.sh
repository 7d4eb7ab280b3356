#!/usr/bin/env bash
# Optional VLMEvalKit backend: a separate venv around an existing VLMEvalKit clone (outside this repo).
#   bash scripts/setup_vlmeval.sh /path/to/VLMEvalKit /path/to/vlmeval-venv
# CPU machine: torch==2.13.0 takes the CPU wheel; PyPI's torchvision 0.28.0 (the release for torch 2.13)
# is CUDA-linked, so its C ops cannot load and two fake-kernel registrations are skipped (the bridge never
# calls torchvision ops). Hydra's pins (omegaconf 2.3, antlr 4.9.3) win over VLMEvalKit's: its offline
# scorers do not need the newer ones (LaTeX answer checking in some judge-scored sets does). pip reports
# those conflicts as 'ERROR: pip's dependency resolver ...' lines: expected, the last line checks the result.
set -euo pipefail
CLONE=${1:?usage: setup_vlmeval.sh VLMEVALKIT_CLONE VENV}
VENV=${2:?usage: setup_vlmeval.sh VLMEVALKIT_CLONE VENV}
PY=${PYTHON:-python3.11}
"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q torch==2.13.0 transformers==5.23.0
"$PIP" install -q --no-deps torchvision==0.28.0
TMP=$(mktemp -d)
printf 'torch==2.13.0\ntorchvision==0.28.0\n' > "$TMP/constraints.txt"
grep -v -E '^(torch|torchvision)$' "$CLONE/requirements.txt" > "$TMP/requirements.txt"
"$PIP" install -q -c "$TMP/constraints.txt" -r "$TMP/requirements.txt" rouge-score
"$PIP" install -q -e "$CLONE" --no-deps
"$PIP" install -q -c "$TMP/constraints.txt" "hydra-core==1.3.8" "omegaconf>=2.3,<2.4" \
    "antlr4-python3-runtime==4.9.3" "tabulate>=0.9" "pytest>=8"
# prunebench itself (editable, this checkout): `<venv>/bin/python -m prunebench` and `<venv>/bin/torchrun -m
# prunebench` then work from any folder
"$PIP" install -q --no-deps -e "$(cd "$(dirname "$0")/.." && pwd)"
META=$("$VENV/bin/python" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py
if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  sed -i 's/^@torch.library.register_fake("torchvision::\(q\?nms\)")/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' "$META"
fi
"$VENV/bin/python" -c "import torchvision, vlmeval.vlm.base, vlmeval.inference, prunebench; print('VLMEvalKit backend ready')"
echo "(pip's 'ERROR: pip's dependency resolver ...' lines above are expected: Hydra's omegaconf / antlr pins win" \
     "over VLMEvalKit's, and the CUDA-linked torchvision has no matching CPU build; 'backend ready' is the check)"
