#!/usr/bin/env bash
# Make the Python venv that tests/serve.rs's official-client test runs: .cache/itt/venv with
# the `openai` package pinned (httpx pinned too: openai < 1.55.3 breaks on httpx >= 0.28).
# Usage: scripts/setup_pyclient.sh   (then: cargo test --release --test serve official_client)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/itt/venv
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet "openai==1.54.4" "httpx==0.27.2"
"$venv/bin/python" -c 'import openai; print("openai", openai.__version__, "in '"$venv"'")'
