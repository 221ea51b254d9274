#!/usr/bin/env python3
"""Data-parallel scaling on one machine (DESIGN §14, docs/PERFORMANCE.md "Data-parallel
training"): training tokens/s of one process with T threads against `mpirun -n P` processes of
T/P threads each, on the same global batch (--grad-accum P), in alternating rounds.

    python3 scripts/mpi_bench.py --bin target/release/itt --preset small --steps 12 --rounds 3

Needs an itt built with `--features mpi` and Open MPI's mpirun (scripts/install_mpi.sh). The
figure is the run's own tokens/s at its last step (set-up and the final validation excluded).
"""
import argparse, json, os, statistics, subprocess, sys, tempfile


def run(cmd, env, out):
    r = subprocess.run(cmd + ["--out", out], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed: {r.stderr.strip()}")
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    last = [l for l in lines if "tokens_per_s" in l][-1]
    return last["tokens_per_s"], last.get("comm_s", 0.0) / max(last["elapsed_s"], 1e-9)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", default="target/release/itt")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of the single process (split over the ranks)")
    a = p.parse_args()
    train = [a.bin, "train", "--preset", a.preset, "--steps", str(a.steps), "--grad-accum", str(a.ranks),
             "--eval-interval", "1000000", "--log-interval", str(a.steps), "--quiet"]
    mpirun = ["mpirun", "-n", str(a.ranks), "--oversubscribe", "--bind-to", "core"]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    single, multi, comm = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            s, _ = run(train, dict(env, RAYON_NUM_THREADS=str(a.threads)), f"{tmp}/s{r}")
            m, c = run(mpirun + train, dict(env, RAYON_NUM_THREADS=str(max(1, a.threads // a.ranks))), f"{tmp}/m{r}")
            single.append(s)
            multi.append(m)
            comm.append(c)
            print(f"round {r + 1}: 1 process x {a.threads} threads {s:.0f} tok/s | "
                  f"{a.ranks} ranks x {max(1, a.threads // a.ranks)} threads {m:.0f} tok/s "
                  f"(collectives {100 * c:.1f}% of rank 0's time) | ratio {m / s:.3f}")
    ratios = [m / s for s, m in zip(single, multi)]
    print(f"median: single {statistics.median(single):.0f} tok/s, mpi {statistics.median(multi):.0f} tok/s, "
          f"ratio {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}), "
          f"collectives {100 * statistics.median(comm):.1f}% of rank 0's time")


if __name__ == "__main__":
    main()
