#!/usr/bin/env bash
# Per-process environment and the training command. One copy runs in each process, started by
#   bash run.sh                                  (mpirun; see run.sh)
#   horovodrun -np 8 -H localhost:8 bash config.sh [CONFIG] [key=value ...]
#   horovodrun -np 16 -H ip1:8,ip2:8 bash config.sh configs/glint360k_r100.py
# With no arguments it trains configs/synthetic.py (or $CONFIG when set).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

CONFIG_FILE=${1:-${CONFIG:-configs/synthetic.py}}
[ $# -gt 0 ] && shift

# Processes on this host, from whichever launcher started us.
LOCAL_SIZE=${OMPI_COMM_WORLD_LOCAL_SIZE:-${HOROVOD_LOCAL_SIZE:-${LOCAL_WORLD_SIZE:-1}}}
CORES=$(nproc)
# Split the host's cores between its processes instead of letting each one spawn a thread per core.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / LOCAL_SIZE > 0 ? CORES / LOCAL_SIZE : 1 ))}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
# NCCL over InfiniBand when present; harmless on CPU-only hosts.
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export HOROVOD_CACHE_CAPACITY=${HOROVOD_CACHE_CAPACITY:-1024}
export PYTHONUNBUFFERED=1

exec "${PYTHON:-python3}" -m partialfc.train "$CONFIG_FILE" "$@"
