#!/usr/bin/env bash
# Shared by scripts/demo.sh and scripts/test.sh: make .venv if missing, install the project (and its test
# extras) into it, and install the real Fashion-MNIST from Debian's dataset-fashion-mnist when apt is available.
# Idempotent: a stamp keyed by pyproject.toml skips the pip step when nothing changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.ddrun-installed
want=$(sha1sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import ddrun.conf" 2>/dev/null; then
  echo "[setup] installing ddrun and its dependencies into .venv (first time: torch + torchvision, a few minutes)"
  log=.venv/pip-install.log
  if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".[test]"; } >"$log" 2>&1 \
     || ! .venv/bin/python -c "import ddrun.conf, torch, torchvision, hydra, wandb" 2>>"$log"; then
    grep -v "^WARNING: Location" "$log" | tail -30 >&2
    echo "[setup] install failed (full log: $log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    echo "[setup] installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
      || echo "[setup] could not install dataset-fashion-mnist; real-data tests will be skipped" >&2
  else
    echo "[setup] apt-get not available: real-data tests will be skipped (see README: Datasets)" >&2
  fi
fi
