#!/usr/bin/env bash
# Install PyTorch (from PyPI, into .cache/itt/venv-torch), build itt, compare them side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cache/itt/venv-torch
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==2.*" numpy
fi
cargo build --release
"$VENV/bin/python" reference/compare.py "$@"
