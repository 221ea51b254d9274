#!/usr/bin/env bash
# Does the learning-rate schedule decide whether ITT passes dense within the demo's 300 steps?
# (issue 24 item 6; docs/EXPERIMENTS.md, "The demo's schedule".) Trains the demo's two models
# (tiny-itt4 and its dense twin, the demo's data and settings) under three schedules and three
# seeds, JOBS runs at a time (default 2) with one thread each, and prints the whole-split
# validation loss.
#   cosine: the demo's (warm-up 20, cosine to 10% at step 300)
#   const:  warm-up, then the peak rate to the end (min_lr_ratio 1)
#   s1500:  the first 300 steps of a 1500-step cosine (schedule_steps 1500)
# Usage: scripts/demo_schedule_probe.sh [OUT]   (default /tmp/itt-demo-schedule; ~12 min on 2 cores)
source "$(dirname "$0")/demo_probe_setup.sh" /tmp/itt-demo-schedule "$@"
python3 - "$OUT" <<'PY'
import copy, json, sys
out = sys.argv[1]
base = {"itt": json.load(open(f"{out}/demo/config.json")), "dense": json.load(open(f"{out}/demo/dense/config.json"))}
for kind, cfg in base.items():
    for name, change in {"cosine": {}, "const": {"min_lr_ratio": 1.0}, "s1500": {"schedule_steps": 1500}}.items():
        c = copy.deepcopy(cfg)
        c["train"].update(change, max_steps=300, eval_interval=300, eval_batches=0)
        json.dump(c, open(f"{out}/{kind}-{name}.json", "w"), indent=1)
PY
for s in 1337 1 2; do for sch in cosine const s1500; do for k in itt dense; do echo "$k-$sch $s"; done; done; done |
    probe_runs
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
def val(k, sch, s):
    lines = [json.loads(l) for l in open(f"{out}/runs/{k}-{sch}-{s}/metrics.jsonl") if '"val_loss"' in l]
    return lines[-1]["val_loss"]
seeds = [1337, 1, 2]
print("| schedule | dense (seeds 1337, 1, 2) | ITT x4 | ITT - dense | mean |")
print("|---|---|---|---|---|")
for sch in ["cosine", "const", "s1500"]:
    d = [val("dense", sch, s) for s in seeds]
    i = [val("itt", sch, s) for s in seeds]
    diff = [a - b for a, b in zip(i, d)]
    f = lambda v: " / ".join(f"{x:.4f}" for x in v)
    print(f"| {sch} | {f(d)} | {f(i)} | {' / '.join(f'{x:+.4f}' for x in diff)} | {statistics.mean(diff):+.4f} |")
PY
