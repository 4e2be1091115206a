#!/usr/bin/env bash
# Launch training with mpirun: one process per device, each running config.sh.
#
#   bash run.sh                                   # configs/synthetic.py on 2 local processes
#   bash run.sh configs/ms1mv3_r50.py lr=0.2      # a config and overrides, NP local processes
#   NP=16 HOSTFILE=hosts bash run.sh configs/glint360k_r100.py
#
# Environment: NP (processes, default 2), HOSTS (e.g. ip1:8,ip2:8) or HOSTFILE (an Open MPI hostfile),
# MPIRUN_ARGS (extra mpirun flags). Variables named PARTIALFC_*, NCCL_*, HOROVOD_* and OMP_NUM_THREADS
# are forwarded to every process.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

NP=${NP:-2}
ARGS=(-np "$NP" --bind-to none --map-by slot)
if [ -n "${HOSTFILE:-}" ]; then
  ARGS+=(--hostfile "$HOSTFILE")
else
  ARGS+=(-H "${HOSTS:-localhost:$NP}")
fi
# Open MPI refuses to run as root, and to place more processes than cores, unless asked.
if [ "$(id -u)" = 0 ]; then ARGS+=(--allow-run-as-root); fi
CORES=$(nproc)
if [ -z "${HOSTFILE:-}" ] && [ -z "${HOSTS:-}" ] && [ "$NP" -gt "$CORES" ]; then ARGS+=(--oversubscribe); fi
# Local runs: keep Open MPI's TCP traffic on loopback, and let a rank that waits in MPI yield its core.
# Horovod's background thread and the DataLoader workers share the cores with the compute thread, so a
# busy-polling wait would take CPU from the ranks that still compute (on a 2-core laptop it costs ~30%).
if [ -z "${HOSTFILE:-}" ] && [ -z "${HOSTS:-}" ]; then
  ARGS+=(--mca btl self,tcp --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo --mca mpi_yield_when_idle 1)
fi
for var in PATH LD_LIBRARY_PATH PYTHONPATH CONFIG; do
  [ -n "${!var:-}" ] && ARGS+=(-x "$var")
done
for var in $(compgen -e | grep -E '^(PARTIALFC_|NCCL_|HOROVOD_|OMP_NUM_THREADS$)' || true); do
  ARGS+=(-x "$var")
done

# shellcheck disable=SC2086
exec mpirun "${ARGS[@]}" ${MPIRUN_ARGS:-} bash config.sh "$@"
