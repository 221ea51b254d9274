# Sourced by the scripts/demo_*_probe.sh probes (issue 24 item 6): from the repository root,
# OUT (the probe's first argument or its default, $1 here) made, ITT the release binary (built
# if missing), and OUT/demo holding the demo's data and configs, written by a one-step demo
# (its folder is replaced each time).
#   source scripts/demo_probe_setup.sh DEFAULT_OUT "$@"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${2:-$1}
ITT=$PWD/target/release/itt
[ -x "$ITT" ] || cargo build --release --bin itt
mkdir -p "$OUT"
"$ITT" demo --steps 1 --out "$OUT/demo" > /dev/null 2>&1
