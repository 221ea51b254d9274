#!/usr/bin/env python3
"""Round-robin timing of `itt bench` under several configurations (docs/PERFORMANCE.md).

On a shared machine the speed drifts while a measurement runs, so configurations are run in
turn, round after round, and each is summarised by medians: the benchmark's own tokens/s
(median of its timed steps), the whole process's wall seconds, and its CPU seconds (user +
system, all threads, from the kernel's accounting of the finished child).

    scripts/bench_rounds.py --rounds 5 --out runs.csv \
        'composed=ITT_COMPOSED_OPS=1 target/release/itt bench --preset small --vocab 4096' \
        'fused=target/release/itt bench --preset small --vocab 4096'

Each configuration is LABEL=COMMAND; leading NAME=VALUE words of COMMAND set environment
variables. Prints a markdown table; --out keeps every run.
"""

import argparse
import csv
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time


def run_once(cmd):
    words = shlex.split(cmd)
    env = dict(os.environ)
    while words and "=" in words[0] and not words[0].startswith(("/", ".")):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run(words + ["--json"], env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"{cmd} failed:\n{p.stderr}")
    report = json.loads(p.stdout[p.stdout.index("{"):])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return report["tokens_per_s"], wall, cpu, report["peak_rss_mb"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="CSV file for every run")
    ap.add_argument("configs", nargs="+", help="LABEL=COMMAND")
    a = ap.parse_args()
    configs = [c.split("=", 1) for c in a.configs]
    rows = []
    for r in range(a.rounds):
        for label, cmd in configs:
            tps, wall, cpu, rss = run_once(cmd)
            rows.append(dict(round=r, label=label, tokens_per_s=tps, wall_s=wall, cpu_s=cpu, peak_rss_mb=rss))
            print(f"round {r} {label}: {tps:.0f} tokens/s, wall {wall:.1f} s, cpu {cpu:.1f} s", file=sys.stderr)
    if a.out:
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    base = None
    print("| configuration | tokens/s (median) | min-max | vs first | process wall s | process CPU s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, _ in configs:
        rs = [x for x in rows if x["label"] == label]
        tps = [x["tokens_per_s"] for x in rs]
        med = statistics.median(tps)
        base = base or med
        print(
            f"| {label} | {med:.0f} | {min(tps):.0f}-{max(tps):.0f} | {med / base:.2f}x "
            f"| {statistics.median(x['wall_s'] for x in rs):.1f} | {statistics.median(x['cpu_s'] for x in rs):.1f} "
            f"| {statistics.median(x['peak_rss_mb'] for x in rs):.0f} |"
        )


if __name__ == "__main__":
    main()
