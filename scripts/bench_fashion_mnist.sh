#!/usr/bin/env bash
# Fashion-MNIST baselines at the CPU budget of src/probssl/configs/fashion_mnist.yaml; results in runs/fm/<method>-s<seed>/eval.json.
# Usage: scripts/bench_fashion_mnist.sh [DATA_DIR] [SEED] ; train everything first, then evaluate.
set -euo pipefail
DATA=${1:-../shared/data}
SEED=${2:-0}
BIN=${BIN:-.venv/bin}
METHODS=${METHODS:-pixels simclr byol simsiam}
for method in $METHODS; do
  out=runs/fm/$method-s$SEED
  if [ ! -f "$out/model.safetensors" ]; then
    resume=""; [ -f "$out/config.yaml" ] && resume="--resume"
    /usr/bin/time -f "$method train wall %e s" $BIN/probssl train --config fashion_mnist --method $method \
      --data-dir "$DATA" --seed "$SEED" --out "$out" --no-progress $resume
  fi
done
[ "${TRAIN_ONLY:-0}" = 1 ] && exit 0
for method in $METHODS; do
  /usr/bin/time -f "$method eval wall %e s" $BIN/probssl eval runs/fm/$method-s$SEED --data-dir "$DATA" --no-progress
done
$BIN/probssl table runs/fm/*-s$SEED --markdown
