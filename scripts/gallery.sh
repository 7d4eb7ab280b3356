#!/usr/bin/env bash
# The README's gallery (issue 17), made from the trained probe (checkpoints/probe_llava) on its own suite:
# random_pre, FastV, DivPrune and VisPruner at keep 0.333 and 0.111 beside vanilla; their kept tokens on one
# sample, their position bias, the Pareto front and the table with paired intervals, under docs/gallery/.
#
#   bash scripts/gallery.sh            (make gallery; LIMIT=N samples per job, default 200; CPU, a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LIMIT=${LIMIT:-200}
RESULTS=${RESULTS:-results/gallery}
OUT=docs/gallery
METHODS=(random_pre fastv divprune vispruner)
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
"$PY" -m prunebench -m "method=$(IFS=,; echo "${METHODS[*]}")" keep=0.333,0.111 limit="$LIMIT" \
    results_dir="$RESULTS" report=false
runs=()
for m in "${METHODS[@]}"; do
    runs+=("$(ls -d "$RESULTS"/probe_llava/probe-n"$LIMIT"/"$m"/keep0.111-seed0-*/ | head -1)")
done
"$PY" -m prunebench.show --compare "${runs[@]}" --out "$OUT/overlays.png"
"$PY" -m prunebench.show --bias "${runs[@]}" --out "$OUT/position_bias.png"
"$PY" -m prunebench.report "$RESULTS" --pareto "$OUT/pareto.png" > "$OUT/table.md"
echo "wrote $OUT/overlays.png, position_bias.png, pareto.png, table.md" >&2
