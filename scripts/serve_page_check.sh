#!/usr/bin/env bash
# The server's web page in headless Chromium: start `itt serve` on a free loopback port, load
# the page with a prompt that it submits itself (`/?autorun=1&prompt=...`), and check that
# generated tokens appear in the page (coloured by depth) and that its screenshot is not blank.
#
# Usage: scripts/serve_page_check.sh CHECKPOINT [OUT_DIR]
#   ITT=path/to/itt (default target/release/itt; build it with `cargo build --release`).
# Needs chromium (Debian: `apt-get install -y chromium`) and python3. Not part of `cargo test`:
# CI machines need not have a browser.
set -euo pipefail

checkpoint=${1:?usage: scripts/serve_page_check.sh CHECKPOINT [OUT_DIR]}
out=${2:-$(mktemp -d)}
itt=${ITT:-target/release/itt}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
[ -x "$itt" ] || { echo "error: $itt is not built; run cargo build --release" >&2; exit 2; }
command -v chromium >/dev/null || { echo "error: no chromium; apt-get install -y chromium" >&2; exit 2; }

"$itt" serve --checkpoint "$checkpoint" --port 0 2>"$out/server.log" &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 200); do
    url=$(sed -n 's/^serving on \(http:[^ ]*\).*/\1/p' "$out/server.log")
    [ -n "$url" ] && break
    kill -0 $server 2>/dev/null || { echo "error: the server did not start:" >&2; cat "$out/server.log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { echo "error: the server did not say where it listens" >&2; exit 1; }
page="$url/?autorun=1&prompt=12%2B34%3D46%0A5%2B17%3D"

profile=$(mktemp -d)
timeout 120 chromium --headless --no-sandbox --disable-gpu --no-first-run --user-data-dir="$profile" \
    --virtual-time-budget=20000 --dump-dom "$page" >"$out/page.html" 2>"$out/chromium.log" || {
    echo "error: chromium failed:" >&2; tail -20 "$out/chromium.log" >&2; exit 1; }
rm -rf "$profile"
tokens=$(grep -o 'class="tok"' "$out/page.html" | wc -l)
if [ "$tokens" -lt 3 ] || ! grep -q 'tokens in' "$out/page.html"; then
    echo "error: the page shows $tokens generated tokens and no finished status; DOM in $out/page.html" >&2
    exit 1
fi
VIRTUAL_TIME_MS=20000 "$here/screenshot.sh" "$page" "$out/page.png" 1000,600 50
echo "ok: $tokens tokens streamed into the page; screenshot $out/page.png"
