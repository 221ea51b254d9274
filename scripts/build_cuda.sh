#!/usr/bin/env bash
# Build `itt` with the CUDA backend (`--features cuda`, DESIGN §15) on a machine without a
# system CUDA toolkit: nvcc, the CUDA runtime headers/library and CCCL come from PyPI wheels
# into a venv, are laid out as one CUDA root, and candle-kernels' build (cudaforge) and
# cudarc's `cuda-version-from-build-system` are pointed at it. No GPU is needed to build.
#
#   scripts/build_cuda.sh            # -> $CARGO_TARGET_DIR/release/itt (default target-cuda/)
#
# Idempotent: the venv and the CUDA root are made once; cargo rebuilds only what changed.
# Settings (environment):
#   CUDA_COMPUTE_CAP  GPU architecture the kernels are compiled for (default 90: H100/H200;
#                     80 for A100, 89 for L4/RTX 40xx). PTX for 90 does not run on older GPUs.
#   CARGO_TARGET_DIR  default <repo>/target-cuda, apart from the default build's target/.
#   ITT_CUDA_VENV     default <repo>/.cache/cuda-venv.
#   ITT_CUDA_FEATURES cargo features (default cuda; cuda,mpi,nccl for data-parallel training
#                     with the gradient sum through NCCL, DESIGN §14).
# The binary loads libcuda (the driver) lazily, so it starts on a machine without one and
# `--device cuda` then fails with a one-line error; it does link libcudart.so.13 (candle's
# quantized-matmul kernels), found at run time through LD_LIBRARY_PATH: on a GPU machine from
# its CUDA or PyTorch install, here from the venv (printed at the end).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${ITT_CUDA_VENV:-$repo/.cache/cuda-venv}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target-cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

# CUDA 13.0 (needs an NVIDIA driver >= 580 at run time; cudarc 0.19 has its bindings). The
# cu12 wheels of nvidia-cuda-nvcc-cu12 hold only ptxas and libnvvm, not the nvcc driver, cicc
# or cudafe++ that compiling .cu files needs; the CUDA 13 wheels hold all of them.
cuda_packages=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)

if [ ! -x "$venv/bin/pip" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.itt-cuda-packages"
if [ "$(cat "$stamp" 2>/dev/null)" != "${cuda_packages[*]}" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${cuda_packages[@]}"
    echo "${cuda_packages[*]}" >"$stamp"
fi

# The wheels lay out one CUDA root under site-packages/nvidia/cu13 (bin/nvcc, nvvm/bin/cicc,
# include/, lib/); only the unversioned libcudart.so that the linker looks for is missing.
root=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
ln -sfn libcudart.so.13 "$root/lib/libcudart.so"

export CUDA_HOME=$root CUDA_ROOT=$root CUDA_PATH=$root
export PATH=$root/bin:$PATH
export NVCC_CCBIN=${NVCC_CCBIN:-$(command -v g++)}
export LIBRARY_PATH=$root/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
nvcc --version | tail -2

cd "$repo"
cargo build --release --features "${ITT_CUDA_FEATURES:-cuda}" --bin itt
echo "built $CARGO_TARGET_DIR/release/itt (features ${ITT_CUDA_FEATURES:-cuda}, CUDA $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute cap $CUDA_COMPUTE_CAP)"
echo "to run it here: LD_LIBRARY_PATH=$root/lib $CARGO_TARGET_DIR/release/itt ..."
