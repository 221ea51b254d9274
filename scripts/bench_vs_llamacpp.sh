#!/usr/bin/env bash
# itt against llama.cpp on one GGUF, same machine, same window (docs/PERFORMANCE.md,
# "Quantized inference"): llama.cpp's `llama-bench` (prefill pp and decode tg at batch 1) and
# `llama-batched-bench` (B streams), then `itt bench --gguf` and `itt bench --gguf --batch`
# with the same shapes, the two alternating round by round; the tables side by side at the end.
#
#   scripts/bench_vs_llamacpp.sh .cache/itt/models/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Environment: THREADS (2), ROUNDS (3), PP (prompt tokens, 128), TG (generated, 64),
# BATCHES (1,4,16), ITT (./target/release/itt; built with cargo if absent), BUILD_ONLY (1: build
# llama.cpp and stop, e.g. while itt builds; the GGUF argument is then not needed).
#
# llama.cpp is built once into .cache/llamacpp from the sources that the llama-cpp-python sdist
# on PyPI vendors (pinned below with its sha256), with cmake and ninja from PyPI in a venv, for
# the CPU it runs on (GGML_NATIVE). Delete .cache/llamacpp to rebuild.
set -euo pipefail
BUILD_ONLY=${BUILD_ONLY:-0}
if [ "$BUILD_ONLY" = 1 ]; then GGUF=${1:-}; else GGUF=${1:?usage: scripts/bench_vs_llamacpp.sh FILE.gguf}; fi
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
PP=${PP:-128}
TG=${TG:-64}
BATCHES=${BATCHES:-1,4,16}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ITT=${ITT:-$ROOT/target/release/itt}
CACHE=$ROOT/.cache/llamacpp
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SDIST=llama_cpp_python-$VERSION.tar.gz

build_llamacpp() {
    [ -x "$CACHE/bin/llama-bench" ] && [ -x "$CACHE/bin/llama-batched-bench" ] && return
    mkdir -p "$CACHE"
    if [ ! -x "$CACHE/venv/bin/cmake" ]; then
        python3 -m venv "$CACHE/venv"
        "$CACHE/venv/bin/pip" install --quiet "cmake>=3.21" ninja
    fi
    if [ ! -f "$CACHE/$SDIST" ]; then
        "$CACHE/venv/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python \
            -d "$CACHE" "llama-cpp-python==$VERSION" || true
    fi
    echo "$SHA256  $CACHE/$SDIST" | sha256sum -c - >&2
    rm -rf "$CACHE/src" && mkdir -p "$CACHE/src"
    tar -xzf "$CACHE/$SDIST" -C "$CACHE/src" --strip-components=1
    local src=$CACHE/src/vendor/llama.cpp
    PATH=$CACHE/venv/bin:$PATH cmake -S "$src" -B "$CACHE/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON >&2
    PATH=$CACHE/venv/bin:$PATH cmake --build "$CACHE/build" --target llama-bench llama-batched-bench -j "$(nproc)" >&2
    mkdir -p "$CACHE/bin"
    cp "$CACHE/build/bin/llama-bench" "$CACHE/build/bin/llama-batched-bench" "$CACHE/bin/"
}

build_llamacpp
if [ "$BUILD_ONLY" = 1 ]; then
    echo "llama.cpp built: $CACHE/bin/llama-bench, $CACHE/bin/llama-batched-bench"
    exit 0
fi
# Builds from before BUILD_SHARED_LIBS=OFF keep their libraries beside them.
export LD_LIBRARY_PATH=$CACHE/build/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [ ! -x "$ITT" ]; then
    (cd "$ROOT" && cargo build --release >&2)
fi

# llama.cpp 0.3.36's AMX weight buffer (picked by default where the CPU has AMX) crashed with a
# segmentation fault in ggml_backend_amx_mul_mat on an Intel Xeon Sapphire Rapids VM (2 vCPUs):
# probe once, and where it fails run without repacking (llama-bench --repack 0, batched -nr),
# which leaves llama.cpp on its AVX-512 / VNNI kernels, and say so.
BENCH_REPACK=()
BATCHED_REPACK=()
if ! "$CACHE/bin/llama-bench" -m "$GGUF" -t "$THREADS" -p 8 -n 4 -r 1 >/dev/null 2>&1; then
    echo "note: llama-bench crashed with its default weight repacking here; both llama.cpp tools run with repacking off" >&2
    BENCH_REPACK=(--repack 0)
    BATCHED_REPACK=(-nr)
fi

OUT=$(mktemp -d)
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; AVX flags: $(grep -o -w 'avx[0-9a-z_]*\|fma\|f16c\|amx[a-z_]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "llama.cpp from llama-cpp-python $VERSION${BENCH_REPACK[*]:+ (weight repacking off: ${BENCH_REPACK[*]})}; $THREADS threads; PP $PP, TG $TG, batches $BATCHES; $ROUNDS rounds"
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r" >&2
    "$CACHE/bin/llama-bench" -m "$GGUF" -t "$THREADS" -p "$PP" -n "$TG" -r 3 "${BENCH_REPACK[@]}" -o md >>"$OUT/llama-bench.$r" 2>/dev/null
    RAYON_NUM_THREADS=$THREADS "$ITT" bench --gguf "$GGUF" --steps 3 --new-tokens "$TG" >>"$OUT/itt-bench.$r"
    "$CACHE/bin/llama-batched-bench" -m "$GGUF" -t "$THREADS" -tb "$THREADS" -c $((16 * (PP + TG) + 64)) \
        -b 2048 -ub 512 -npp "$PP" -ntg "$TG" -npl "$BATCHES" "${BATCHED_REPACK[@]}" 2>/dev/null | grep '^|' >>"$OUT/llama-batched.$r"
    RAYON_NUM_THREADS=$THREADS "$ITT" bench --gguf "$GGUF" --batch "$BATCHES" --prompt-len "$PP" \
        --new-tokens "$TG" --steps 1 | grep '^|' >>"$OUT/itt-batched.$r"
done
for r in $(seq 1 "$ROUNDS"); do
    echo
    echo "== round $r: batch 1 (llama-bench | itt bench --gguf, 53-token prompt) =="
    cat "$OUT/llama-bench.$r" "$OUT/itt-bench.$r"
    echo "== round $r: batched, llama-batched-bench then itt bench --gguf --batch =="
    echo "llama.cpp:"
    cat "$OUT/llama-batched.$r"
    echo "itt:"
    cat "$OUT/itt-batched.$r"
done
rm -rf "$OUT"
