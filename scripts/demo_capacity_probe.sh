#!/usr/bin/env bash
# Does ITT pass dense within the demo's 300 steps when every token takes the extra steps early
# in training? (issue 24 item 6; docs/EXPERIMENTS.md, "The demo's capacity".) At 300 steps the
# old table-3 ablation without routing (every token, every step) was ahead of dense on three
# seeds, and at 1500 steps the default passes dense while its rate is high. The demo's
# tiny-itt4 with its routed shares at 100% throughout ("all100"), or falling from 100% to the
# trained 70% over the first half ("warm50") or the whole run ("warm100"; capacity warm-up),
# and the dense twin, seeds 1337 (the demo's), 1 and 2, JOBS runs at a time (default 2) with
# one thread each. Prints validation loss with thinking on (top-k at the shares the run ended
# with) and off (one step per layer).
# Usage: scripts/demo_capacity_probe.sh [OUT]   (default /tmp/itt-demo-capacity; ~8 min on 2 cores)
source "$(dirname "$0")/demo_probe_setup.sh" /tmp/itt-demo-capacity "$@"
python3 - "$OUT" <<'PY'
import copy, json, sys
out = sys.argv[1]
itt, dense = json.load(open(f"{out}/demo/config.json")), json.load(open(f"{out}/demo/dense/config.json"))
runs = {"dense": (dense, {}, {}), "all100": (itt, {"ratios": [1.0, 1.0, 1.0]}, {}),
        "warm50": (itt, {}, {"capacity_warmup": 0.5}), "warm100": (itt, {}, {"capacity_warmup": 1.0})}
for name, (base, thinking, train) in runs.items():
    c = copy.deepcopy(base)
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
KINDS="all100 warm50 warm100"
for s in 1337 1 2; do for k in dense $KINDS; do echo "$k $s"; done; done | xargs -P "${JOBS:-2}" -L 1 bash -c 'run "$@"' _
for s in 1337 1 2; do for k in $KINDS; do
    [ -e "$OUT/runs/$k-$s/off.json" ] ||
        "$ITT" eval --checkpoint "$OUT/runs/$k-$s" --data "$OUT/demo/data" --steps 1 --json > "$OUT/runs/$k-$s/off.json"
done; done
python3 - "$OUT" $KINDS <<'PY'
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
