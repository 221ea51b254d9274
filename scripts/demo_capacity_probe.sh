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
for s in 1337 1 2; do for k in dense all100 warm50 warm100; do echo "$k $s"; done; done | probe_runs
probe_gain_table all100 warm50 warm100
