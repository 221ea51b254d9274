#!/usr/bin/env bash
# Render an HTML page (e.g. from `itt analyze depth` or `itt report`) in headless Chromium,
# save a screenshot, and check that it is not blank: the PNG must decode and hold more than
# MIN_COLORS distinct colours (a blank or error page has a handful).
#
# Usage: scripts/screenshot.sh PAGE.html|URL OUT.png [WIDTH,HEIGHT] [MIN_COLORS]
# VIRTUAL_TIME_MS=N lets the page's scripts run for N ms of virtual time first.
#   defaults: 1200,900 and 50.
# Needs chromium (Debian: `apt-get install -y chromium`) and python3 (standard library only).
# Not part of `cargo test`: CI machines need not have a browser.
set -euo pipefail

page=${1:?usage: scripts/screenshot.sh PAGE.html OUT.png [WIDTH,HEIGHT] [MIN_COLORS]}
out=${2:?usage: scripts/screenshot.sh PAGE.html OUT.png [WIDTH,HEIGHT] [MIN_COLORS]}
size=${3:-1200,900}
min_colors=${4:-50}

browser=""
for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then browser=$b; break; fi
done
if [ -z "$browser" ]; then
    echo "error: no chromium found; install it (Debian: apt-get install -y chromium)" >&2
    exit 2
fi
case "$page" in
    http://*|https://*) url=$page ;;
    *)
        if [ ! -f "$page" ]; then
            echo "error: $page does not exist" >&2
            exit 2
        fi
        url="file://$(cd "$(dirname "$page")" && pwd)/$(basename "$page")"
        ;;
esac

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
rm -f "$out"
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
    --user-data-dir="$profile" --window-size="$size" ${VIRTUAL_TIME_MS:+--virtual-time-budget=$VIRTUAL_TIME_MS} --screenshot="$out" "$url" \
    >"$profile/chromium.log" 2>&1 || {
    echo "error: chromium failed; its log:" >&2
    tail -20 "$profile/chromium.log" >&2
    exit 1
}
if [ ! -s "$out" ]; then
    echo "error: chromium wrote no screenshot to $out" >&2
    tail -20 "$profile/chromium.log" >&2
    exit 1
fi

python3 - "$out" "$min_colors" <<'EOF'
# Minimal PNG decoder (8-bit greyscale/RGB/RGBA, non-interlaced: what Chromium writes),
# standard library only, then a count of distinct colours.
import struct, sys, zlib

path, min_colors = sys.argv[1], int(sys.argv[2])
data = open(path, "rb").read()
if data[:8] != b"\x89PNG\r\n\x1a\n":
    sys.exit(f"error: {path} is not a PNG")
pos, idat, ihdr = 8, b"", None
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    if kind == b"IHDR":
        ihdr = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
        idat += body
    pos += 12 + n
w, h, depth, ctype, _, _, interlace = ihdr
channels = {0: 1, 2: 3, 6: 4}.get(ctype)
if depth != 8 or channels is None or interlace:
    sys.exit(f"error: unsupported PNG (depth {depth}, colour type {ctype}, interlace {interlace})")
raw = zlib.decompress(idat)
stride = w * channels
prev = bytearray(stride)
colors = set()
for y in range(h):
    f = raw[y * (stride + 1)]
    line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for i in range(stride):
        a = line[i - channels] if i >= channels else 0
        b = prev[i]
        c = prev[i - channels] if i >= channels else 0
        if f == 1:
            line[i] = (line[i] + a) & 255
        elif f == 2:
            line[i] = (line[i] + b) & 255
        elif f == 3:
            line[i] = (line[i] + (a + b) // 2) & 255
        elif f == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    if y % 2 == 0:  # every other row is plenty for a colour count
        colors.update(bytes(line[i:i + channels]) for i in range(0, stride, channels * 2))
    prev = line
print(f"{path}: {w}x{h}, {len(colors)} distinct colours (sampled)")
if len(colors) <= min_colors:
    sys.exit(f"error: the screenshot looks blank ({len(colors)} colours, need more than {min_colors})")
EOF
