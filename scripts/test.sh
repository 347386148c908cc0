#!/usr/bin/env bash
# Set up (.venv, ddrun, Fashion-MNIST) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q "$@"
