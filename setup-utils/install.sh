#!/usr/bin/env bash
# Whole set-up on a fresh Debian machine, idempotent: Open MPI, PyTorch (only if missing), the Python
# requirements, Horovod with PyTorch support, and the partialfc package with its compiled extension.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PY=${PYTHON:-python3}
PIP="$PY -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

bash "$HERE/install-mpi.sh"

# Never replace a torch the user already has (it may be a CUDA build); pin the version only when missing,
# because an unpinned "torch" resolves to a multi-GB CUDA wheel.
if $PY -c 'import torch' 2>/dev/null; then
  echo "[install] torch $($PY -c 'import torch; print(torch.__version__)') already installed"
else
  echo "[install] installing torch==2.13.0"
  $PIP install -q torch==2.13.0
fi

# Requirements are installed with torch held fixed, so no dependency can pull a different torch.
TORCH_PIN=$(mktemp)
$PY -c 'import torch; print("torch==" + torch.__version__)' > "$TORCH_PIN"
$PIP install -q -r "$HERE/requirements.txt" -c "$TORCH_PIN"
rm -f "$TORCH_PIN"

bash "$HERE/install-horovod.sh"

# The package itself: the compiled extension built in place, and an editable install so that
# `python -m partialfc...` works from any directory.
if [ -f "$ROOT/setup.py" ]; then
  (cd "$ROOT" && $PY setup.py -q build_ext --inplace)
  INSTALLED=$(cd / && $PY -c 'import os, partialfc; print(os.path.dirname(os.path.dirname(os.path.abspath(partialfc.__file__))))' 2>/dev/null || true)
  if [ "$INSTALLED" != "$ROOT" ]; then
    $PIP install -q --no-build-isolation --no-deps -e "$ROOT"
  fi
fi
echo "[install] done"
