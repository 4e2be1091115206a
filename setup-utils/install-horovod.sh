#!/usr/bin/env bash
# Builds Horovod 0.28.1 with PyTorch, Gloo and MPI support from its PyPI sdist.
#
# Horovod 0.28.1 as released compiles its torch bindings as C++14, which torch >= 2.1 headers reject
# (horovod issues #3996/#4014; the fix was never released). We patch CMAKE_CXX_STANDARD to 17 in the
# two CMakeLists that set it and build without isolation against the torch that is already installed.
# pip's cmake 4 refuses gloo's old cmake_minimum_required, so a system cmake < 4 is used (or the policy
# floor is lowered when only cmake 4 is available).
set -euo pipefail
PY=${PYTHON:-python3}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}

if $PY - <<'PYEOF' 2>/dev/null
import horovod.torch as hvd  # noqa: F401  (import fails when the torch extension was not built)
PYEOF
then
  echo "[install-horovod] horovod.torch already importable: $($PY -c 'import horovod; print(horovod.__version__)')"
  exit 0
fi

if ! command -v cmake >/dev/null 2>&1; then
  SUDO=""; if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cmake >/dev/null
fi
CMAKE_MAJOR=$(cmake --version | head -1 | sed -E 's/[^0-9]*([0-9]+)\..*/\1/')
if [ "$CMAKE_MAJOR" -ge 4 ]; then
  export CMAKE_POLICY_VERSION_MINIMUM=3.5
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "[install-horovod] fetching horovod==$HOROVOD_VERSION sdist"
$PY -m pip download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WORK" -q
tar -xzf "$WORK"/horovod-"$HOROVOD_VERSION".tar.gz -C "$WORK"
SRC="$WORK/horovod-$HOROVOD_VERSION"
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
grep -q 'CMAKE_CXX_STANDARD 17' "$SRC/horovod/torch/CMakeLists.txt" || { echo "[install-horovod] could not patch C++ standard"; exit 1; }

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
if command -v mpicxx >/dev/null 2>&1; then export HOROVOD_WITH_MPI=1; fi
if $PY -c 'import torch,sys; sys.exit(0 if torch.version.cuda else 1)' && command -v nvcc >/dev/null 2>&1; then
  export HOROVOD_GPU_OPERATIONS=NCCL
fi
export MAKEFLAGS="-j$(nproc)"
echo "[install-horovod] building (several minutes on a small machine)"
$PY -m pip install --no-build-isolation --no-cache-dir -q "$SRC"
$PY -c 'import horovod.torch as hvd; print("[install-horovod] ok, horovod", __import__("horovod").__version__, "gloo", hvd.gloo_built(), "mpi", hvd.mpi_built())'
