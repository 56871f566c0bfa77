#!/usr/bin/env bash
# cSGHMC benchmark (issue #4, design.md §3.1): three arms at one budget on Fashion-MNIST, per seed:
#   byol-s<seed>        (a) deterministic BYOL (SGD, warm-up + cosine)
#   snapshot-s<seed>    (b) cSGHMC's cyclical schedule and sample positions, temperature 0 (no noise)
#   csghmc-s<seed>      (c) cSGHMC (textbook variant, T = 0.1, 4 cycles × 3 samples)
# Usage: scripts/bench_csghmc.sh [DATA_DIR] [SEEDS...]; trains what is missing, evaluates (suite
# `uncertainty`) what has no eval.json, then prints the mean ± std table.
set -euo pipefail
DATA=${1:-../shared/data}
shift || true
SEEDS=${*:-0 1 2}
BIN=${BIN:-.venv/bin}
declare -A ARGS=(
  [byol]="--method byol"
  [snapshot]="--method csghmc method.temperature=0"
  [csghmc]="--method csghmc"
)
for seed in $SEEDS; do
  for arm in byol snapshot csghmc; do
    out=runs/fm/$arm-s$seed
    if [ ! -f "$out/model.safetensors" ]; then
      resume=""; [ -f "$out/config.yaml" ] && resume="--resume"
      # shellcheck disable=SC2086
      /usr/bin/time -f "$arm-s$seed train wall %e s" $BIN/probssl train --config fashion_mnist \
        ${ARGS[$arm]} --data-dir "$DATA" --seed "$seed" --out "$out" --no-progress $resume
    fi
    if [ ! -f "$out/eval.json" ]; then
      /usr/bin/time -f "$arm-s$seed eval wall %e s" $BIN/probssl eval "$out" --data-dir "$DATA" \
        --suite uncertainty --no-progress
    fi
  done
done
runs=()
for arm in byol snapshot csghmc; do for seed in $SEEDS; do runs+=("runs/fm/$arm-s$seed"); done; done
$BIN/probssl table "${runs[@]}" --by-seed --markdown \
  --columns linear/top1,knn/top1@20,cal/ece15,cal/brier,linear/nll,ood/mnist/entropy/auroc,ood/mnist/mi/auroc,ood/mnist/emb/auroc
