#!/usr/bin/env bash
# One GPU, ≤ 8 minutes: speed table of every arm + SimCLR on CIFAR-10 (data and augmentation on the GPU)
# for as many epochs as fit, then its kNN accuracy. Results: $OUT if set, else runs/gpu_check/.
#   scripts/gpu_check.sh --data-dir ../shared/data        # on the GPU machine
#   scripts/gpu_check.sh --dry-run                        # the same code on the CPU in seconds
# Needs a Python with torch (CUDA build on the GPU machine), kornia, numpy, scipy, scikit-learn, pyyaml,
# safetensors, tqdm: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
if ! "$PY" -c "import torch, kornia, yaml, safetensors, scipy, sklearn" 2>/dev/null; then
  echo "error: $PY lacks torch/kornia/pyyaml/safetensors/scipy/scikit-learn; set PYTHON to an interpreter with them" >&2
  exit 2
fi
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" scripts/gpu_check.py "$@"
