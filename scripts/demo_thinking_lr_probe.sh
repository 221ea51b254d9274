#!/usr/bin/env bash
# Do steps that start near a no-op but learn fast let ITT pass dense within the demo's 300
# steps? (issue 24 item 6; docs/EXPERIMENTS.md, "The demo's problems".) The demo's tiny-itt4
# with its thinking parameters (routers, step vectors phi) on 10x the learning rate
# (`thinking_lr_scale` 10), with phi at its default 1 ("lr10") and at 0.1 ("phi01lr10"), and
# the dense twin, seeds 1337 (the demo's), 1 and 2, two runs at a time with one thread each.
# Prints validation loss with thinking on (top-k, as trained) and off (one step per layer).
# Usage: scripts/demo_thinking_lr_probe.sh [OUT]   (default /tmp/itt-demo-lr; ~6 min on 2 cores)
source "$(dirname "$0")/demo_probe_setup.sh" /tmp/itt-demo-lr "$@"
python3 - "$OUT" <<'PY'
import copy, json, sys
out = sys.argv[1]
itt, dense = json.load(open(f"{out}/demo/config.json")), json.load(open(f"{out}/demo/dense/config.json"))
runs = {"dense": (dense, {}, {}), "lr10": (itt, {}, {"thinking_lr_scale": 10.0}),
        "phi01lr10": (itt, {"phi_init": 0.1}, {"thinking_lr_scale": 10.0})}
for name, (base, thinking, train) in runs.items():
    c = copy.deepcopy(base)
    if thinking:
        c["model"]["thinking"].update(thinking)
    c["train"].update(train, max_steps=300, eval_interval=300, eval_batches=0)
    json.dump(c, open(f"{out}/{name}.json", "w"), indent=1)
PY
run() {  # kind seed
    local dir="$OUT/runs/$1-$2"
    if [ ! -e "$dir/latest" ]; then
        RAYON_NUM_THREADS=1 "$ITT" train --config "$OUT/$1.json" --data "$OUT/demo/data" --seed "$2" \
            --out "$dir" --quiet > /dev/null
    fi
}
export -f run; export OUT ITT
for s in 1337 1 2; do for k in lr10 dense phi01lr10; do echo "$k $s"; done; done | xargs -P 2 -L 1 bash -c 'run "$@"' _
for s in 1337 1 2; do for k in lr10 phi01lr10; do
    "$ITT" eval --checkpoint "$OUT/runs/$k-$s" --data "$OUT/demo/data" --steps 1 --json > "$OUT/runs/$k-$s/off.json"
done; done
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
def val(run):
    return [json.loads(l) for l in open(f"{out}/runs/{run}/metrics.jsonl") if '"val_loss"' in l][-1]["val_loss"]
seeds = [1337, 1, 2]
dense = [val(f"dense-{s}") for s in seeds]
print("| model | val loss (seeds 1337 / 1 / 2) | minus dense | mean | thinking gain | mean |")
print("|---|---|---|---|---|---|")
print(f"| dense | {' / '.join(f'{x:.4f}' for x in dense)} | | | | |")
for k in ["lr10", "phi01lr10"]:
    on = [val(f"{k}-{s}") for s in seeds]
    off = [json.load(open(f"{out}/runs/{k}-{s}/off.json"))["loss"] for s in seeds]
    d = [a - b for a, b in zip(on, dense)]
    g = [b - a for a, b in zip(on, off)]
    p = lambda v: " / ".join(f"{x:+.4f}" for x in v)
    print(f"| {k} | {' / '.join(f'{x:.4f}' for x in on)} | {p(d)} | {statistics.mean(d):+.4f} | {p(g)} | {statistics.mean(g):+.4f} |")
PY
