#!/usr/bin/env bash
# Evaluate one trained run with two versions of probssl and compare their cost and their numbers.
#
#   scripts/compare_eval.sh OTHER_CHECKOUT RUN_DIR [DATA_DIR]
#
# OTHER_CHECKOUT is another checkout of this repository (e.g. `git worktree add --detach ../old adf82ac`);
# this checkout is the other side. Each side evaluates a fresh copy of RUN_DIR's weights (features
# recomputed, `--suite full`) on one thread, one after the other, so the CPU seconds per stage compare.
# Prints per side: wall and CPU seconds (total and per stage); then how many numbers differ and by
# how much. Used for BENCHMARKS.md "Evaluation cost" (issue 19). Copies live under ${TMPDIR:-/tmp}.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OTHER_CHECKOUT RUN_DIR [DATA_DIR]" >&2
  exit 2
fi
other=$(cd "$1" && pwd)
run=$(cd "$2" && pwd)
data=${3:-${PROBSSL_DATA:-../shared/data}}
data=$(cd "$data" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
[ -f "$other/src/probssl/__init__.py" ] || { echo "error: $other is not a probssl checkout" >&2; exit 2; }
[ -f "$run/model.safetensors" ] || { echo "error: $run has no model.safetensors (train it first)" >&2; exit 2; }
work=$(mktemp -d "${TMPDIR:-/tmp}/compare_eval.XXXXXX")
for side in other this; do
  copy="$work/$side"
  mkdir -p "$copy"
  # weights and what describes them; posterior samples (cSGHMC) live in samples/
  for f in config.yaml dataset_info.json model.json model.safetensors train_summary.json samples; do
    [ -e "$run/$f" ] && cp -r "$run/$f" "$copy/"
  done
  src=$here/src
  [ "$side" = other ] && src=$other/src
  (cd "$work" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$src" \
    "$python" -m probssl eval "$copy" --data-dir "$data" --no-progress >"$copy.log" 2>&1) ||
    { echo "error: the $side side failed; see $copy.log" >&2; exit 1; }
done
"$python" - "$work" <<'PY'
import json
import statistics
import sys

work = sys.argv[1]
runs = {side: json.load(open(f"{work}/{side}/eval.json")) for side in ("other", "this")}
for side, d in runs.items():
    cpu = {k.rsplit("/", 1)[1]: round(v, 1) for k, v in d.items() if k.startswith("meta/eval_cpu_seconds/")}
    print(f"{side}: wall {d['meta/eval_seconds']:.1f} s, CPU {sum(cpu.values()):.1f} s {cpu}")
a, b = runs["other"], runs["this"]
keys = [
    k for k in a
    if isinstance(a[k], float) and isinstance(b.get(k), float) and not k.startswith(("meta/", "config/"))
]
deltas = sorted(((abs(a[k] - b[k]), k) for k in keys), reverse=True)
print(f"{len(keys)} numbers, {sum(d == 0 for d, _ in deltas)} identical, "
      f"median |Δ| {statistics.median(d for d, _ in deltas):.2g}; largest:")
for delta, key in deltas[:8]:
    print(f"  {key}: {a[key]:.6g} -> {b[key]:.6g} (|Δ| {delta:.2g})")
print(f"copies and logs: {work}")
PY
