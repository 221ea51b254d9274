#!/usr/bin/env bash
# Do steps that start near a no-op but learn fast let ITT pass dense within the demo's 300
# steps? (issue 24 item 6; docs/EXPERIMENTS.md, "The demo's problems".) The demo's tiny-itt4
# with its thinking parameters (routers, step vectors phi) on 10x the learning rate
# (`thinking_lr_scale` 10), with phi at its default 1 ("lr10") and at 0.1 ("phi01lr10"), and
# the dense twin, seeds 1337 (the demo's), 1 and 2, JOBS runs at a time (default 2), one thread each.
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
for s in 1337 1 2; do for k in lr10 dense phi01lr10; do echo "$k $s"; done; done | probe_runs
probe_gain_table lr10 phi01lr10
