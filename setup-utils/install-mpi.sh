#!/usr/bin/env bash
# Installs Open MPI (runtime and headers) from Debian's packages unless mpirun and mpicc are already there.
set -euo pipefail
if command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1; then
  echo "[install-mpi] MPI already present: $(mpirun --version 2>/dev/null | head -1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "[install-mpi] installing openmpi-bin libopenmpi-dev from apt"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
mpirun --version | head -1
