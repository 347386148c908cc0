#!/usr/bin/env bash
# Set up (.venv, ddrun, Fashion-MNIST) and run the test suite. Extra arguments go to pytest (after ours, so
# `-n 0` runs in one process and `-k dataset` picks tests).
# The tests run in parallel, one pytest-xdist worker per core (at most 8; DDRUN_TEST_WORKERS sets the number):
# most of them are single-threaded (a `ddrun` process starting up, a small network), so one process would leave
# cores idle. tests/conftest.py splits torch's threads between the workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true
workers=${DDRUN_TEST_WORKERS:-$(.venv/bin/python -c "import os
n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
print(min(8, n))")}
exec .venv/bin/python -m pytest -q -n "$workers" "$@"
