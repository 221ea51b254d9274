#!/usr/bin/env bash
# Make the Python venv that tests/serve.rs's official-client test runs: .cache/itt/venv with
# the `openai` package pinned (httpx pinned too: openai < 1.55.3 breaks on httpx >= 0.28).
# Built in a temporary folder and moved into place when complete, so an interrupted setup never
# leaves a venv without the client. The test runs this itself on first use.
# Usage: scripts/setup_pyclient.sh   (then: cargo test --release --test serve official_client)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/itt/venv
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import openai' 2>/dev/null; then
    echo "openai venv already at $venv"
    exit 0
fi
mkdir -p .cache/itt
tmp=$(mktemp -d .cache/itt/venv.tmp.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if ! python3 -m venv "$tmp" 2>/dev/null; then
    # Debian and Ubuntu ship venv's pip bootstrap separately.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q python3-venv >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null; }
        rm -rf "$tmp" && mkdir -p "$tmp"
        python3 -m venv "$tmp"
    else
        echo "error: python3 -m venv failed; install python3-venv (e.g. apt-get install python3-venv)" >&2
        exit 1
    fi
fi
"$tmp/bin/python" -m pip install --quiet --disable-pip-version-check "openai==1.54.4" "httpx==0.27.2"
rm -rf "$venv"
mv "$tmp" "$venv"
trap - EXIT
"$venv/bin/python" -c 'import openai; print("openai", openai.__version__, "in '"$venv"'")'
