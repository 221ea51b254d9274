# Sourced by the scripts/demo_*_probe.sh probes (issue 24 item 6): from the repository root,
# OUT (the probe's first argument or its default, $1 here) made, ITT the release binary (built
# if missing), and OUT/demo holding the demo's data and configs, written by a one-step demo
# (its folder is replaced each time). Then `probe_runs` trains the "CONFIG SEED" lines of its
# input, and `probe_gain_table KIND...` prints each kind against dense with thinking on and off.
#   source scripts/demo_probe_setup.sh DEFAULT_OUT "$@"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${2:-$1}
ITT=$PWD/target/release/itt
[ -x "$ITT" ] || cargo build --release --bin itt
mkdir -p "$OUT"
"$ITT" demo --steps 1 --out "$OUT/demo" > /dev/null 2>&1

# Trains OUT/CONFIG.json on the demo's data with SEED into OUT/runs/CONFIG-SEED on one thread,
# unless that run finished before (a probe run again reuses its runs).
probe_run() {  # CONFIG SEED
    local dir="$OUT/runs/$1-$2"
    if [ ! -e "$dir/latest" ]; then
        RAYON_NUM_THREADS=1 "$ITT" train --config "$OUT/$1.json" --data "$OUT/demo/data" --seed "$2" \
            --out "$dir" --quiet > /dev/null
    fi
}
export -f probe_run
export OUT ITT

# probe_run for each "CONFIG SEED" line of stdin, JOBS (default 2) at a time.
probe_runs() {
    xargs -P "${JOBS:-2}" -L 1 bash -c 'probe_run "$@"' _
}

# For each KIND trained on seeds 1337 (the demo's), 1 and 2: validation loss (top-k, as
# trained) minus dense's, and the thinking gain (the same weights with one step per layer).
probe_gain_table() {  # KIND...
    local k s
    for s in 1337 1 2; do for k in "$@"; do
        [ -e "$OUT/runs/$k-$s/off.json" ] ||
            "$ITT" eval --checkpoint "$OUT/runs/$k-$s" --data "$OUT/demo/data" --steps 1 --json > "$OUT/runs/$k-$s/off.json"
    done; done
    python3 - "$OUT" "$@" <<'PY'
import json, statistics, sys
out, kinds = sys.argv[1], sys.argv[2:]
def val(run):
    return [json.loads(l) for l in open(f"{out}/runs/{run}/metrics.jsonl") if '"val_loss"' in l][-1]["val_loss"]
seeds = [1337, 1, 2]
dense = [val(f"dense-{s}") for s in seeds]
print("| model | val loss (seeds 1337 / 1 / 2) | minus dense | mean | thinking gain | mean |")
print("|---|---|---|---|---|---|")
print(f"| dense | {' / '.join(f'{x:.4f}' for x in dense)} | | | | |")
for k in kinds:
    on = [val(f"{k}-{s}") for s in seeds]
    off = [json.load(open(f"{out}/runs/{k}-{s}/off.json"))["loss"] for s in seeds]
    d = [a - b for a, b in zip(on, dense)]
    g = [b - a for a, b in zip(on, off)]
    p = lambda v: " / ".join(f"{x:+.4f}" for x in v)
    print(f"| {k} | {' / '.join(f'{x:.4f}' for x in on)} | {p(d)} | {statistics.mean(d):+.4f} | {p(g)} | {statistics.mean(g):+.4f} |")
PY
}
