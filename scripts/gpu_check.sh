#!/usr/bin/env bash
# The GPU check of issue 12, from a fresh copy of the repository on a machine with a CUDA GPU, in under 8 minutes:
#   1. a Python with ddrun's dependencies (the one given as $PYTHON or python3 when it already imports them;
#      else .venv + `pip install -e .[test]`, which needs PyPI; without it the script says so and stops);
#   2. the real Fashion-MNIST from .data/fashion-mnist/*.gz (shipped with the copy) or /usr/share/datasets/...,
#      decompressed once into $DDRUN_DATA/FashionMNIST/raw/ (DDRUN_DATA defaults to a temporary directory);
#   3. the whole test suite with device=auto (so CUDA), every test's outcome logged as it finishes;
#   4. scripts/bench.py at the issue's settings (Fashion-MNIST, ConvNet-3 width 128, batch_real 256, DSA):
#      DM ipc 1/10/50, DC and DSA ipc 1/10, MTT ipc 1/10 (20 syn_steps, plain vs memory-efficient), the speed knobs
#      (channels_last, class-batched DC/DSA, deterministic) on DM/DC/DSA ipc 1, and the eval group (5 ConvNets x
#      300 epochs at ipc 10, one after the other vs stacked; and stacked under speed.autocast=bf16: its time and
#      accuracy beside float32's, the parity check of the bf16 option; and stacked under speed.compile=true);
#   5. a summary (GPU, versions, failed tests, the bench tables) in $OUT/gpu_summary.md when $OUT is set, else
#      on stdout. Every phase has its own time limit and the summary is rewritten after each, so a cut-short run
#      still leaves what it did.
# DDRUN_GPU_CHECK_CPU=1 runs the same steps on the CPU with a tiny subset (seconds-sized settings): the script's
# own test. Time limits (seconds) can be changed with GPU_CHECK_TEST_S, GPU_CHECK_BENCH_S; GPU_CHECK_TESTS (pytest
# arguments, or "none") and GPU_CHECK_BENCHES (names among "methods knobs deterministic mtt eval bf16 compile",
# and the opt-in "profile_eval profile_compile profile_mtt": torch.profiler tables of the stacked evaluator, eager
# and compiled, and MTT's two gradients) pick what runs, so a short second lease reruns only what a fix touched.
# Where pytest-xdist is importable the suite runs in GPU_CHECK_WORKERS processes (8 by default on a GPU, 2 CPU
# threads each; 0 runs it in one process).
# Paper budgets in chunks (opt-in, last): GPU_CHECK_REPRODUCE="dc_ipc10 ..." continues those scripts/reproduce.sh
# runs for GPU_CHECK_REPRODUCE_S seconds (default 300) from the folders in GPU_CHECK_REPRODUCE_FROM (default
# .runs/reproduce: what an earlier lease brought back, carried with the copy), working in $OUT/reproduce, so the next
# lease continues where this one stopped (each run stops at a checkpoint; resumed, it ends with the S of an
# uninterrupted run).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CPU=${DDRUN_GPU_CHECK_CPU:-0}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/ddrun-gpu-check}
mkdir -p "$WORK"
rm -f "$WORK"/bench_*.md "$WORK/reproduce.log"   # a rerun in the same WORK reports only what it ran
SUMMARY=${OUT:+$OUT/gpu_summary.md}
SUMMARY=${SUMMARY:-$WORK/gpu_summary.md}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
note() { echo "[gpu_check $(elapsed)s] $*" >&2; }

# ---- 1. Python ------------------------------------------------------------------------------------------------
PY=${PYTHON:-python3}
need="import torch, torchvision, hydra, omegaconf, wandb, pytest, tqdm, scipy, matplotlib, yaml, submitit"
if ! "$PY" -c "$need" 2>/dev/null; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "$need" 2>/dev/null; then
    PY=.venv/bin/python
  else
    note "no Python with ddrun's dependencies: creating .venv and running pip install -e .[test] (needs PyPI)"
    "$PY" -m venv --system-site-packages .venv && .venv/bin/python -m pip install -q -e ".[test]" \
      >"$WORK/pip.log" 2>&1 && PY=.venv/bin/python
    if ! "$PY" -c "$need" 2>/dev/null; then
      { echo "# ddrun GPU check: setup failed"; echo; echo "pip install -e .[test] did not give a working Python" \
        "(no PyPI access?); last lines of $WORK/pip.log:"; echo '```'; tail -20 "$WORK/pip.log"; echo '```'; } \
        | tee "$SUMMARY"
      exit 1
    fi
  fi
fi
[ -e ddrun/conf ] || ln -s ../conf ddrun/conf   # ddrun.conf from the checkout without installing (as pip -e does)
# the `ddrun` command beside the interpreter (scripts/sbatch_example.sh, and so its test, call it): where it is missing,
# ddrun itself is installed editable, without dependencies and without an index
if ! "$PY" -c "import os, sys; sys.exit(not os.path.exists(os.path.join(os.path.dirname(sys.executable), 'ddrun')))"; then
  note "installing the ddrun command: pip install --no-deps --no-build-isolation --no-index -e ."
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$WORK/pip_ddrun.log" 2>&1 \
    || note "pip install -e . failed ($WORK/pip_ddrun.log): the tests that call the ddrun command will fail"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export WANDB_MODE=offline WANDB_SILENT=true CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
if [ "$CPU" = 1 ]; then DEVICE=cpu; else DEVICE=auto; fi
if [ "$CPU" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  note "CUDA is not available to $PY: the suite and the bench would run on the CPU; stopping"
  echo "# ddrun GPU check: torch.cuda.is_available() is False with $PY" | tee "$SUMMARY"
  exit 1
fi
ENV_LINE=$("$PY" -c "import torch, platform; d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU';
print(f'{d}; torch {torch.__version__} (CUDA {torch.version.cuda}); Python {platform.python_version()}; {torch.get_num_threads()} CPU threads')")

# ---- 2. Fashion-MNIST -------------------------------------------------------------------------------------------
export DDRUN_DATA=${DDRUN_DATA:-$WORK/data}
RAW=$DDRUN_DATA/FashionMNIST/raw
mkdir -p "$RAW"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  [ -s "$RAW/$f" ] && continue
  for d in .data/fashion-mnist /usr/share/datasets/fashion-mnist; do
    if [ -s "$d/$f.gz" ]; then gzip -dc "$d/$f.gz" >"$RAW/$f.tmp" && mv "$RAW/$f.tmp" "$RAW/$f"; break; fi
  done
  [ -s "$RAW/$f" ] || note "Fashion-MNIST file $f not found in .data/fashion-mnist/ (real-data tests skip, bench fails)"
done

# ---- 3. the test suite ----------------------------------------------------------------------------------------
WORKERS=${GPU_CHECK_WORKERS:-$( [ "$CPU" = 1 ] && echo 0 || echo 8 )}
XDIST=() THREADS=()
if [ "$WORKERS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "$WORKERS") THREADS=(OMP_NUM_THREADS=2)
fi
if [ "$CPU" = 1 ]; then
  TESTS=(tests/test_speed.py -k "dm_chunked or match_loss or bad_speed or deterministic_repeats")
  TEST_S=${GPU_CHECK_TEST_S:-300}
else
  TEST_S=${GPU_CHECK_TEST_S:-190}
  if [ ${#XDIST[@]} -gt 0 ]; then
    TESTS=(tests)   # in parallel the order no longer decides what a cut-short run reports
  else  # the tests this issue touched first (a cut-short run still reports them), then the rest of the suite
    TESTS=(tests/test_speed.py tests/test_distill.py tests/test_resume.py tests/test_mtt.py tests/test_evaluate_cmd.py tests)
  fi
fi
[ -n "${GPU_CHECK_TESTS:-}" ] && eval "TESTS=($GPU_CHECK_TESTS)"   # shell words: -k "a or b" stays one
if [ "${TESTS[*]}" = none ]; then
  : >"$WORK/pytest.log"; TEST_RC=skipped
else
  note "pytest ${XDIST[*]} ${TESTS[*]} (limit ${TEST_S}s)"
  env "${THREADS[@]}" \
    timeout -k 10 "$TEST_S" "$PY" -m pytest -v -rfE -p no:cacheprovider -o addopts="" "${XDIST[@]}" "${TESTS[@]}" \
    >"$WORK/pytest.log" 2>&1
  TEST_RC=$?
  [ -n "${OUT:-}" ] && cp "$WORK/pytest.log" "$OUT/pytest.log"
fi
TEST_T=$(elapsed)

summary() {
  {
    echo "# ddrun GPU check ($( [ "$CPU" = 1 ] && echo "CPU path, tiny subset" || echo "device=auto" ))"
    echo
    echo "- machine: $ENV_LINE"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); elapsed $(elapsed) s"
    echo "- tests: \`pytest -v ${XDIST[*]} ${TESTS[*]}\` exit $TEST_RC$( [ "$TEST_RC" = 124 ] && echo " (cut at ${TEST_S}s)") in ${TEST_T} s:" \
      "$(grep -cE '(PASSED|XPASS)( |$)' "$WORK/pytest.log") passed, $(grep -cE ' (FAILED|ERROR)( |$)' "$WORK/pytest.log") failed/error," \
      "$(grep -cE ' SKIPPED( |$)' "$WORK/pytest.log") skipped"
    echo
    echo "## Failed tests"
    echo
    grep -E '^(tests/[^ ]+) (FAILED|ERROR)|(FAILED|ERROR) tests/' "$WORK/pytest.log" | grep -Ev '^(FAILED|ERROR) ' \
      | sed -E 's/ *\[ *[0-9]*%\]$//; s/^\[gw[0-9]+\] \[ *[0-9]+%\] (FAILED|ERROR) (.*)/\2 \1/; s/^/- /' || true
    if grep -q "short test summary info" "$WORK/pytest.log"; then
      echo; echo "pytest's summary:"; echo '```'
      sed -n '/short test summary info/,$p' "$WORK/pytest.log" | grep -E '^(FAILED|ERROR)' | cut -c1-300
      echo '```'
    fi
    echo
    echo "## Benchmarks"
    for name in methods knobs deterministic mtt eval bf16 compile profile_eval profile_compile profile_mtt; do
      [ -f "$WORK/bench_$name.md" ] && { echo; cat "$WORK/bench_$name.md"; }
    done
    if [ -f "$WORK/reproduce.log" ]; then
      echo; echo "## Paper-budget runs (scripts/reproduce.sh ${GPU_CHECK_REPRODUCE:-})"; echo; echo '```'
      cat "$WORK/reproduce.log"; echo '```'
    fi
  } >"$SUMMARY"
}
summary

# ---- 4. benchmarks ----------------------------------------------------------------------------------------------
BENCH_S=${GPU_CHECK_BENCH_S:-200}
BENCHES=" ${GPU_CHECK_BENCHES:-methods knobs deterministic mtt eval bf16 compile} "
bench() {  # bench NAME LIMIT_S ARGS...: one bench.py run, its table in $WORK/bench_NAME.md
  local name=$1 limit=$2 t0; shift 2
  [[ "$BENCHES" == *" $name "* ]] || return 0
  t0=$(date +%s)
  note "bench $name: $* (limit ${limit}s)"
  { echo "### $name"; echo; echo "\`python scripts/bench.py $*\`"; echo; } >"$WORK/bench_$name.md"
  timeout -k 5 "$limit" "$PY" scripts/bench.py --device "$DEVICE" "$@" >>"$WORK/bench_$name.md" 2>"$WORK/bench_$name.err"
  local rc=$?
  [ $rc = 0 ] || { echo; echo "(exit $rc$( [ $rc = 124 ] && echo ": cut at ${limit}s"); $(tail -1 "$WORK/bench_$name.err"))"; } \
    >>"$WORK/bench_$name.md"
  echo "(this phase: $(( $(date +%s) - t0 )) s wall, its warm-up run and any compilation included)" \
    >>"$WORK/bench_$name.md"
  summary
}
if [ "$CPU" = 1 ]; then
  TINY=(--iters 1 --warmup 0 --set dataset.train_subset=20 dataset.test_subset=20 objective.batch_real=8)
  bench methods "$BENCH_S" --groups basic --ipc 1 --only '^(dm|dsa) ipc1$' "${TINY[@]}"
  bench knobs "$BENCH_S" --groups basic --ipc 1 --only '^dc ipc1$' "${TINY[@]}" speed.batched_classes=true
  bench mtt "$BENCH_S" --groups mtt --ipc 1 --only 'syn_steps 10 memory' --iters 1 --warmup 0 \
    --set objective.lr_lr=1e-9 objective.syn_steps=2
  bench eval "$BENCH_S" --groups eval --eval-epochs 2 --set dataset.test_subset=20
  bench bf16 "$BENCH_S" --groups eval --eval-epochs 2 --only sequential --set dataset.test_subset=20 speed.autocast=bf16
  bench compile "$BENCH_S" --groups eval --eval-epochs 2 --eval-warmup 1 --only stacked \
    --set dataset.test_subset=20 speed.compile=true
  bench profile_eval "$BENCH_S" --groups eval --eval-epochs 1 --only stacked --profile 10 --set dataset.test_subset=20
  bench profile_compile "$BENCH_S" --groups eval --eval-epochs 1 --eval-warmup 1 --only stacked --profile 10 \
    --set dataset.test_subset=20 speed.compile=true
  bench profile_mtt "$BENCH_S" --groups mtt --ipc 1 --only 'syn_steps 10 memory' --iters 1 --warmup 0 --profile 10 \
    --set objective.lr_lr=1e-9 objective.syn_steps=2
else
  # the issue's GPU table: DM ipc 1/10/50, DC ipc 1/10, DSA ipc 1; then what the knobs cost or save
  bench methods 90 --groups basic --ipc 1,10,50 --only '^(dm ipc(1|10|50)|dc ipc(1|10)|dsa ipc1)$' --iters 4
  bench knobs 35 --groups basic --ipc 1 --only '^(dm|dc) ipc1$' --set speed.channels_last=false speed.batched_classes=false
  bench deterministic 20 --groups basic --ipc 1 --only '^dsa ipc1$' --set deterministic=true
  bench mtt 60 --groups mtt --ipc 1,10 --only 'syn_steps 20' --set objective.lr_lr=1e-9
  bench eval 80 --groups eval --eval-epochs 300 --eval-warmup 1
  bench bf16 20 --groups eval --eval-epochs 300 --only stacked --set speed.autocast=bf16
  bench compile 110 --groups eval --eval-epochs 300 --eval-warmup 1 --only stacked --set speed.compile=true
  # opt-in (GPU_CHECK_BENCHES=...profile_eval profile_compile profile_mtt): where the time of the missed targets goes
  bench profile_eval 40 --groups eval --eval-epochs 20 --only stacked --profile 25
  bench profile_compile 80 --groups eval --eval-epochs 20 --eval-warmup 1 --only stacked --profile 25 \
    --set speed.compile=true
  bench profile_mtt 40 --groups mtt --ipc 1 --only 'syn_steps 20' --profile 25 --set objective.lr_lr=1e-9
fi
summary

# ---- 5. paper budgets in chunks (opt-in) --------------------------------------------------------------------------
if [ -n "${GPU_CHECK_REPRODUCE:-}" ]; then
  # the runs work in $OUT/reproduce itself, so a lease cut short still returns the last checkpoints it wrote
  RDIR=${OUT:+$OUT/reproduce} FROM=${GPU_CHECK_REPRODUCE_FROM:-.runs/reproduce}
  RDIR=${RDIR:-$WORK/reproduce}
  mkdir -p "$RDIR"
  [ -d "$FROM" ] && cp -r "$FROM/." "$RDIR/"
  # a run lock that came with the folders was left by a machine that is gone (a killed lease): not a live run
  find "$RDIR" -mindepth 2 -maxdepth 2 -name .lock -print -delete | sed 's/^/removed the stale lock /' >&2
  RSET=()
  [ "$CPU" = 1 ] && RSET=(device=cpu iterations=6 checkpoint_every=1 dataset.train_subset=20 dataset.test_subset=20
    evaluator.num_eval=1 evaluator.epochs=2 objective.batch_real=8 schedule.inner_loop=2 schedule.outer_loop=2)
  note "reproduce: $GPU_CHECK_REPRODUCE (limit ${GPU_CHECK_REPRODUCE_S:-300}s, from $FROM)"
  REPRODUCE_LIMIT_S=${GPU_CHECK_REPRODUCE_S:-300} REPRODUCE_SET="${RSET[*]}" DDRUN="$PY -m ddrun.cli" PYTHON="$PY" \
    bash scripts/reproduce.sh "$RDIR" $GPU_CHECK_REPRODUCE >"$WORK/reproduce.log" 2>&1 \
    || echo "(scripts/reproduce.sh exit $?)" >>"$WORK/reproduce.log"
  summary
fi
note "done in $(elapsed)s; summary: $SUMMARY"
[ -n "${OUT:-}" ] || cat "$SUMMARY"
