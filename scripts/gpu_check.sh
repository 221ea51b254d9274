#!/usr/bin/env bash
# Checks of the CUDA build on a machine with an NVIDIA GPU (DESIGN §15). Needs no Rust and no
# network: give it a binary built with `scripts/build_cuda.sh` (libcudart.so.13 must be
# findable, e.g. LD_LIBRARY_PATH=<venv>/lib/python3.*/site-packages/nvidia/cu13/lib).
#
#   ITT_BIN=target-cuda/release/itt scripts/gpu_check.sh
#
# 1. 20 steps of tiny-itt4 on the built-in data, f32, same seed, on the CPU and on the GPU:
#    every step's training loss within 1e-3 relative.
# 2. Cached decoding equals the full pass on the GPU: greedy generation with KV caches and
#    without (`--no-cache`), both with causal threshold routing, give the same text.
# 3. `itt bench --device cuda` for paper-162m, -loop4 and -itt4 in bf16: tokens/s, peak GPU
#    memory and model FLOP utilisation against the H200's 989 bf16 TFLOP/s
#    (ITT_GPU_PEAK_TFLOPS to change it).
#
# GPU_DEVICE=cpu runs every step on the CPU instead (a dry run of the script where there is no
# GPU; step 3 then times a small preset). Exits non-zero on the first failed check.
set -euo pipefail

bin=${ITT_BIN:?set ITT_BIN to an itt binary built with --features cuda}
gpu=${GPU_DEVICE:-cuda}
work=${WORK_DIR:-$(mktemp -d)}
steps=${CHECK_STEPS:-20}
echo "itt: $bin | device: $gpu | work: $work"

# --- 1. CPU and GPU training from the same seed ---------------------------------------------
train() {
    "$bin" train --preset tiny-itt4 --steps "$steps" --seed 7 --precision f32 --quiet \
        --eval-interval "$steps" --log-interval 1 --out "$work/$1" --device "$2"
}
train run-cpu cpu
train run-device "$gpu"
python3 - "$work/run-cpu/metrics.jsonl" "$work/run-device/metrics.jsonl" <<'EOF'
import json, sys
def losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(path)) if r.get("loss") is not None]
cpu, gpu = losses(sys.argv[1]), losses(sys.argv[2])
assert [s for s, _ in cpu] == [s for s, _ in gpu] and cpu, f"steps differ: {cpu} vs {gpu}"
worst = max(abs(a - b) / abs(a) for (_, a), (_, b) in zip(cpu, gpu))
print(f"1. training losses, {len(cpu)} logged steps: max relative difference CPU vs GPU {worst:.2e} (limit 1e-3)")
sys.exit(0 if worst <= 1e-3 else 1)
EOF

# --- 2. cached decoding equals the full pass on the GPU -------------------------------------
gen() {
    "$bin" generate --checkpoint "$work/run-device" --prompt "12+34=" --prompt "sort 3 1 2:" \
        --max-new-tokens 24 --temperature 0 --routing threshold --device "$gpu" "$@"
}
cached=$(gen)
full=$(gen --no-cache)
if [ "$cached" != "$full" ]; then
    printf '2. FAILED: cached decoding differs from the full pass\n--- cached\n%s\n--- full\n%s\n' "$cached" "$full"
    exit 1
fi
echo "2. cached decoding equals the full pass on $gpu (2 prompts, 24 greedy tokens, threshold routing)"

# --- 3. throughput, memory and MFU of the paper-size models ---------------------------------
if [ "$gpu" = cpu ]; then
    presets=(tiny tiny-loop4 tiny-itt4) bench_args=(--batch-size 2 --seq-len 32 --steps 1)
else
    presets=(paper-162m paper-162m-loop4 paper-162m-itt4) bench_args=(--batch-size 8 --seq-len 1024 --steps 5)
fi
echo "3. training throughput on $gpu, bf16 products"
for p in "${presets[@]}"; do
    "$bin" bench --preset "$p" --precision bf16 --device "$gpu" "${bench_args[@]}"
done
if command -v nvidia-smi >/dev/null && [ "$gpu" != cpu ]; then
    nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv
fi
echo "all checks passed"
