#!/usr/bin/env bash
# The "Results on this machine" runs of README.md: Fashion-MNIST, ipc 1 and 10, CPU-sized distillation budgets,
# every set evaluated with the same protocol (EVAL below) and the same seed. Usage: bash scripts/results.sh [OUT]
# Prints the table at the end (scripts/results_table.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/results}
DDRUN=${DDRUN:-.venv/bin/ddrun}
# Evaluation protocol shared by every row: 3 ConvNet-128 runs x 300 epochs, DSA, full 10k test split, seed 0.
EVAL="evaluator.num_eval=3 evaluator.epochs=300 seed=0 eval_at_start=false logger.mode=offline"
run() {  # run NAME OVERRIDES...
  local name=$1; shift
  if [ -f "$OUT/$name/synthetic.pt" ]; then echo "== $name: done already"; return; fi
  echo "== $name: $DDRUN distill $* $EVAL"
  $DDRUN distill "$@" $EVAL hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1 || { echo "   failed, see $OUT/$name.log"; return 1; }
  grep "final accuracy" "$OUT/$name.log"
}
mkdir -p "$OUT"
for ipc in 1 10; do
  run random_ipc$ipc method=random ipc=$ipc
  run dm_ipc$ipc method=dm ipc=$ipc iterations=100 eval_every=100 objective.batch_real=64
done
run dc_ipc1 method=dc ipc=1 iterations=100 eval_every=100 objective.batch_real=64
run dsa_ipc1 method=dsa ipc=1 iterations=100 eval_every=100 objective.batch_real=64
run dc_ipc10 method=dc ipc=10 iterations=4 eval_every=4 objective.batch_real=64 fetcher.inner_loop=5
run dsa_ipc10 method=dsa ipc=10 iterations=4 eval_every=4 objective.batch_real=64 fetcher.inner_loop=5
.venv/bin/python scripts/results_table.py "$OUT"
