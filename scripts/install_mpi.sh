#!/usr/bin/env bash
# Installs what `--features mpi` needs, from Debian's packages: Open MPI (mpirun, headers,
# libmpi) and libclang (the mpi crate generates its bindings with bindgen). Does nothing when
# they are already there. Used by .ci/run; see README "Data-parallel training".
set -euo pipefail
have() { command -v mpirun >/dev/null && command -v mpicc >/dev/null && ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; }
if have; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends openmpi-bin libopenmpi-dev libclang-dev
have || { echo "error: Open MPI or libclang still missing after apt-get install" >&2; exit 1; }
