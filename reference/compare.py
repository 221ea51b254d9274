"""Side by side: `itt` (Rust, candle) against the PyTorch twin in itt_torch.py, same shapes,
same threads, alternating A B A B so that drift in the machine's speed hits both.

    reference/compare.sh                       # sets up PyTorch, builds itt, runs everything
    python reference/compare.py --repeats 3    # with torch importable and target/release/itt built
    python reference/compare.py --itt-vs-loop 16   # ITT x4 @0.5 against Loop x4 (itt only)

Prints a markdown table of medians and the ratio itt / PyTorch for the training step (fp32
against fp32, and `itt --precision bf16` against PyTorch bf16 autocast), prefill and cached
decode, with peak memory; then the f32 training runs pair by pair (the median and range of
the pairs' ratios, by median step and by fastest step), the figure to quote on a VM whose
speed drifts. Not a test.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ITT = os.path.join(HERE, "..", "target", "release", "itt")


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


def pair_summary(preset, ours, theirs):
    """One table row: the pairs' ratios (PyTorch's step time over itt's), by median and fastest
    step. On a shared VM the speed drifts by tens of percent over minutes, and pairs taken a few
    seconds apart see the same machine, so the median of the pair ratios is the figure to quote."""
    def spread(key):
        r = sorted(t[key] / o[key] for o, t in zip(ours, theirs))
        return f"{statistics.median(r):.2f} ({r[0]:.2f}-{r[-1]:.2f})"
    return f"| {preset} | {len(ours)} | {spread('step_s_median')} | {spread('step_s_min')} |"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-presets", default="small,small-loop4,small-itt4")
    ap.add_argument("--decode-presets", default="tiny,tiny-loop4,tiny-itt4")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-bf16", action="store_true",
                    help="f32 only: on CPUs without bf16 products (AVX2-only) PyTorch's bf16 "
                    "autocast takes minutes a run and itt's bf16 falls back to f32")
    ap.add_argument("--itt-vs-loop", type=int, metavar="PAIRS", default=0,
                    help="instead: issue 7's routing target, PAIRS alternating runs of ITT x4 at ratios "
                         "0.5/0.5/0.5 and Loop x4 (itt only, no PyTorch), f32 and bf16")
    a = ap.parse_args()
    if a.itt_vs_loop:
        itt_vs_loop(a.itt_vs_loop, a.vocab, max(a.steps, 6))
        return
    py = [sys.executable, os.path.join(HERE, "itt_torch.py")]
    rows, pair_rows = [], []
    for p in filter(None, a.train_presets.split(",")):
        res = {"itt": [], "torch": [], "itt_bf16": [], "torch_bf16": []}
        common = ["--preset", p, "--vocab", str(a.vocab), "--steps", str(a.steps)]
        for _ in range(a.repeats):
            res["itt"] += run([ITT, "bench", *common, "--json"])
            res["torch"] += run(py + ["bench", *common])
            if not a.no_bf16:
                res["itt_bf16"] += run([ITT, "bench", *common, "--precision", "bf16", "--json"])
                res["torch_bf16"] += run(py + ["bench", *common, "--bf16"])
        pair_rows.append(pair_summary(p, res["itt"], res["torch"]))
        med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in res.items() if v}
        mem = {k: statistics.median(r["peak_rss_mb"] for r in v) for k, v in res.items() if v}
        tail = (f"| {med['itt_bf16']:.0f} | {med['torch_bf16']:.0f} | {med['itt_bf16'] / med['torch_bf16']:.2f} "
                f"| {mem['itt']:.0f} / {mem['torch']:.0f} | {mem['itt_bf16']:.0f} / {mem['torch_bf16']:.0f} |"
                if "itt_bf16" in med else f"| – | – | – | {mem['itt']:.0f} / {mem['torch']:.0f} | – |")
        rows.append(f"| train step | {p} | {med['itt']:.0f} | {med['torch']:.0f} | {med['itt'] / med['torch']:.2f} {tail}")
    for p in filter(None, a.decode_presets.split(",")):
        ours, theirs = [], []
        for _ in range(a.repeats):
            ours += run([ITT, "bench", "--decode", p, "--vocab", str(a.vocab), "--json"])
            theirs += run(py + ["decode", "--preset", p, "--vocab", str(a.vocab)])
        for key, label in [("prefill_tokens_per_s", "prefill"), ("decode_cached_tokens_per_s", "cached decode")]:
            o = statistics.median(r[key] for r in ours)
            t = statistics.median(r[key] for r in theirs)
            rows.append(f"| {label} | {p} | {o:.0f} | {t:.0f} | {o / t:.2f} | – | – | – | – | – |")
    print(f"vocab {a.vocab}, 2 threads, medians of {a.repeats} alternating runs\n")
    print("| measurement | preset | itt f32 tok/s | PyTorch fp32 tok/s | ratio | itt bf16 tok/s "
          "| PyTorch bf16 tok/s | ratio | peak MiB f32 itt / torch | peak MiB bf16 itt / torch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if pair_rows:
        print(f"\nf32 train step, pair by pair (run i of itt against run i of PyTorch): PyTorch step "
              f"seconds / itt's, from each run's median step and from its fastest step\n")
        print("| preset | pairs | ratio of median steps: median (min-max) | ratio of fastest steps: median (min-max) |")
        print("|---|---|---|---|")
        print("\n".join(pair_rows))


def itt_vs_loop(pairs, vocab, steps):
    """Step time of small-itt4 with every routed step at ratio 0.5 over that of small-loop4,
    taken pair by pair from alternating runs (the machine's speed drifts between minutes)."""
    import tempfile

    out = subprocess.run([ITT, "info", "--preset", "small-itt4", "--json"], capture_output=True, text=True, check=True)
    cfg = json.loads(out.stdout)
    cfg["model"]["thinking"]["ratios"] = [0.5, 0.5, 0.5]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    common = ["--vocab", str(vocab), "--steps", str(steps), "--json"]
    print(f"ITT x4 @0.5/0.5/0.5 vs Loop x4, vocab {vocab}, {steps} timed steps a run, {pairs} pairs\n")
    print("| precision | ITT s (median) | Loop s (median) | ratio: median of pairs | min | max |")
    print("|---|---|---|---|---|---|")
    try:
        for precision in ["f32", "bf16"]:
            itt, loop, ratios = [], [], []
            for _ in range(pairs):
                a = run([ITT, "bench", "--config", f.name, "--precision", precision, *common])[0]["step_s_median"]
                b = run([ITT, "bench", "--preset", "small-loop4", "--precision", precision, *common])[0]["step_s_median"]
                itt.append(a)
                loop.append(b)
                ratios.append(a / b)
            print(f"| {precision} | {statistics.median(itt):.3f} | {statistics.median(loop):.3f} "
                  f"| {statistics.median(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} |")
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    main()
