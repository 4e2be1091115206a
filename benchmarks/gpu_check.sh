#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build partialfc._C for that GPU, run the CUDA tests (also under
# compute-sanitizer), time the head step in bf16 and a short bf16 training run against the backbone alone.
#
#     bash benchmarks/gpu_check.sh [OUTPUT_DIR]        # default: $OUT, else ./gpu_check_out
#
# Run from the repository root (or anywhere: it changes into the root). Each stage logs to
# OUTPUT_DIR/logs/<stage>.log, runs under a timeout and within an overall budget (GPU_CHECK_BUDGET_S, default 420 s:
# a stage gets what is left of it, and is skipped when under 15 s are left); a failed stage does not stop the
# next. At the end OUTPUT_DIR/summary.txt lists each stage's status, wall time and key figures (with the tail
# of each failed stage's log), and the logs are packed into OUTPUT_DIR/logs.tar.gz.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_STAGES (a space-separated subset of
# the stage names below, to rerun some of them; default all), GPU_CHECK_TRAIN_STEPS (default 40).
# Nothing here needs Horovod: training runs under torch.distributed.run (torchrun) with comm_backend=torch.
# See docs/benchmarks.md, "GPU check".
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
OUTDIR=${1:-${OUT:-$ROOT/gpu_check_out}}
mkdir -p "$OUTDIR/logs" || exit 1
OUTDIR=$(cd "$OUTDIR" && pwd)
LOGS=$OUTDIR/logs
SUMMARY=$OUTDIR/summary.txt
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
BUDGET=${GPU_CHECK_BUDGET_S:-420}
STAGES=${GPU_CHECK_STAGES:-all}
TRAIN_STEPS=${GPU_CHECK_TRAIN_STEPS:-40}
START=$SECONDS
# Training output (a 2M-class table is 4 GB on disk) goes to scratch space, never into OUTDIR.
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/partialfc_gpu_check.XXXXXX") || exit 1
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# A missing extension must fail the tests, not skip them (tests/ops/conftest.py).
export CI=true

# The training run: configs/partial_fc_1millions_8gpu_r50.py (r50, rec='random', SGD) at 2M classes on one
# process, bf16 autocast. rec='random' needs num_classes and num_image.
TRAIN_CONFIG=configs/partial_fc_1millions_8gpu_r50.py
TRAIN_OVERRIDES=(
  num_classes=2000000
  num_image=2000000
  sample_rate=0.1
  fp16=False
  amp_dtype=bfloat16
  comm_backend=torch
  device=cuda
  batch_size=128
  num_workers=4
  max_steps="$TRAIN_STEPS"
  lr_scheduler=poly
  frequent=10
  verbose=0
  "val_targets=[]"
  tensorboard=False
  save_all_states=False
)

declare -a ROWS=()  # name|status|wall seconds|key figures, one per stage run

log() { echo "[gpu_check $(( SECONDS - START ))s] $*"; }

wanted() { [[ $STAGES == all || " $STAGES " == *" $1 "* ]]; }

# run_stage NAME CAP_SECONDS CMD...: CMD's output to logs/NAME.log under a timeout of min(CAP, what is left of
# the budget); records status and wall time. CMD is a program (timeout runs no shell functions: the stages
# written as functions run through `bash -c`, exported).
run_stage() {
  local name=$1 cap=$2
  shift 2
  wanted "$name" || return 0
  local left=$(( BUDGET - (SECONDS - START) ))
  local limit=$(( cap < left ? cap : left ))
  local logfile=$LOGS/$name.log
  if (( limit < 15 )); then
    ROWS+=("$name|skipped (budget spent)|0|")
    log "$name: skipped, ${left}s of the budget left"
    return 0
  fi
  log "$name: up to ${limit}s -> $logfile"
  local t0=$SECONDS rc
  { echo "\$ $*"; echo; } >"$logfile"
  timeout --kill-after=15 "$limit" "$@" >>"$logfile" 2>&1
  rc=$?
  local wall=$(( SECONDS - t0 )) status
  case $rc in
    0) status=ok ;;
    5) status="no tests selected" ;;  # pytest's exit status when -k selects nothing
    124|137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  ROWS+=("$name|$status|$wall|$(figures "$name" "$logfile")")
  log "$name: $status in ${wall}s"
}

# pytest's closing line ("3 failed, 40 passed, 2 skipped in 12.3s"), with or without its '=' rule.
pytest_counts() {
  grep -E '([0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)|no tests ran).* in [0-9.]+s' "$1" \
    | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//'
}

# Key figures of a stage, read off its log.
figures() {
  local name=$1 logfile=$2
  case $name in
    versions) grep -E '^(gpu|torch|nvcc):' "$logfile" | tr '\n' ';' ;;
    build) grep -E '^(built|TORCH_CUDA_ARCH_LIST)' "$logfile" | tr '\n' ';' ;;
    tests_*) pytest_counts "$logfile" ;;
    sanitizer) { grep -E 'ERROR SUMMARY' "$logfile" | tail -1; pytest_counts "$logfile"; } | tr '\n' ';' ;;
    head_step_bf16) grep -E '^[0-9,]+ classes|^  (fused|dense|gemm) |^  (dense / fused|fused / gemm)' "$logfile" \
                      | sed 's/  */ /g' | tr '\n' ';' ;;
    host_centers) grep -E '^  (backbone stand-in|link:)' "$logfile" | sed 's/  */ /g' | tr '\n' ';' ;;
    finite_check) grep -E '^  (is_finite|all_finite|bound / pass)' "$logfile" | sed 's/  */ /g' | tr '\n' ';' ;;
    train_head) grep -Eo 'step [0-9]+/[0-9]+ .*' "$logfile" | tail -1 \
                  | grep -Eo 'step [0-9]+/[0-9]+|loss [0-9.na]+|speed [0-9.]+ samples/s|peak mem [0-9]+ MB' \
                  | tr '\n' ';' ;;
    backbone_only) grep -E '^backbone only' "$logfile" | tail -1 ;;
  esac
}

# ---------------------------------------------------------------------------------------------------------
# Stages

stage_versions() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
  "$PY" - <<'PY'
import sys
import torch
print(f"torch: {torch.__version__} CUDA {torch.version.cuda} Python {sys.version.split()[0]}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2 ** 30:.0f} GiB")
else:
    print("device: torch sees no CUDA device")
PY
  local nvcc
  nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
  echo "nvcc: $("$nvcc" --version 2>&1 | grep -E 'release' | sed 's/.*release/release/')"
  echo "compute-sanitizer: $(compute-sanitizer --version 2>&1 | grep -Ei 'version' | head -1)"
  echo "horovod: $("$PY" -c 'import horovod; print(horovod.__version__)' 2>/dev/null || echo 'not installed')"
  "$PY" -c 'import easydict' 2>/dev/null || echo "easydict: not installed (the stand-in on PYTHONPATH is used)"
  nvidia-smi || true
}

stage_build() {
  local arch
  arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || return 1
  echo "TORCH_CUDA_ARCH_LIST=$arch"
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=16 "$PY" setup.py build_ext --inplace || return 1
  "$PY" - <<'PY'
from partialfc.ops import extension
assert extension.available(), f"partialfc._C does not load: {extension.LOAD_ERROR}"
assert extension.with_cuda(), "partialfc._C was built without CUDA kernels"
from partialfc import _build_info
print("built partialfc._C with CUDA kernels for", getattr(_build_info, "CUDA_ARCH_LIST", "?"))
PY
}

# The backbone alone, as the trainer runs it (same config, launcher, data-parallel wrapper, optimizer,
# autocast, gradient clipping, one host sync per step), on a fixed batch already on the device: no head, no
# data loading. Mean step time over the timed steps, comparable with the trainer's windowed speed.
write_backbone_snippet() {
  cat >"$1" <<'PY'
import statistics
import sys
import time

import torch

from partialfc.backbones import build_backbone
from partialfc.config import load_config
from partialfc.train import amp_dtype_of, backbone_optimizer, training_device

warmup, steps, path, overrides = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
config = load_config(path, overrides)
comm, device = training_device(config)
torch.manual_seed(config.seed)
backbone = build_backbone(config).to(device)
model, optimizer = comm.data_parallel(backbone, backbone_optimizer(config, backbone, comm), 1)
amp = amp_dtype_of(config)
images = torch.rand(config.batch_size, 3, 112, 112, device=device).mul_(2).sub_(1)
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
times = []
for i in range(warmup + steps):
    sync()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        embeddings = model(images)
    loss = embeddings.float().square().mean()
    loss.backward()
    comm.wait_for_gradients(optimizer)
    torch.nn.utils.clip_grad_norm_(backbone.parameters(), config.clip_grad_norm or float("inf"))
    comm.step_after_wait(optimizer)
    optimizer.zero_grad(set_to_none=True)
    loss.item()
    sync()
    if i >= warmup:
        times.append(time.perf_counter() - start)
batch = config.batch_size * comm.size
mean, median = statistics.mean(times), statistics.median(times)
if comm.rank == 0:
    print(f"backbone only: {config.network} batch {batch} amp {amp}: {batch / mean:.1f} samples/s "
          f"(mean {mean * 1e3:.2f} ms/step, median {median * 1e3:.2f} ms over {steps} steps after {warmup})")
comm.shutdown()
PY
}

# Config files import easydict; where it is not installed, a stand-in (partialfc's own attribute dict).
easydict_standin() {
  "$PY" -c 'import easydict' 2>/dev/null && return 0
  mkdir -p "$SCRATCH/standin"
  echo 'from partialfc.config import Config as EasyDict  # noqa: F401' >"$SCRATCH/standin/easydict.py"
  export PYTHONPATH="$PYTHONPATH:$SCRATCH/standin"
}

# ---------------------------------------------------------------------------------------------------------

log "output in $OUTDIR, budget ${BUDGET}s, stages: $STAGES"
easydict_standin
write_backbone_snippet "$SCRATCH/backbone_only.py"
export PY
export -f stage_versions stage_build

run_stage versions 30 bash -c stage_versions
run_stage build 240 bash -c stage_build
# The compile check (test_cuda_compile.py) is left out: the build has just compiled every .cu file.
run_stage tests_ops_cuda 90 "$PY" -m pytest -q -p no:cacheprovider tests/ops -k "cuda and not compile" \
  --ignore=tests/ops/test_cuda_ops.py
run_stage tests_cuda_ops 150 "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_cuda_ops.py
run_stage tests_partial_fc_cuda 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_partial_fc.py -k cuda
# Without the caching allocator memcheck sees each tensor's own bounds. The subprocess and 2^31-element cases
# are left out (slow under the tool; the rest covers the same kernels).
run_stage sanitizer 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
  --target-processes application-only "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_cuda_ops.py \
  -k "not subprocess and not 2_31"
run_stage head_step_bf16 180 "$PY" benchmarks/head_step.py --device cuda --dtype bfloat16 \
  --classes 1000000 10000000 --batch 512 --variants fused dense gemm --json "$OUTDIR/head_step_bf16.json"
run_stage finite_check 60 "$PY" benchmarks/finite_check.py --device cuda --classes 10000000 --batch 512 \
  --dtype bfloat16
run_stage host_centers 90 "$PY" benchmarks/host_centers.py --device cuda --classes 10000000 --batch 512 \
  --json "$OUTDIR/host_centers.json"
run_stage train_head 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m partialfc.train \
  "$TRAIN_CONFIG" "${TRAIN_OVERRIDES[@]}" output="$SCRATCH/train_head"
run_stage backbone_only 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
  "$SCRATCH/backbone_only.py" 5 30 "$TRAIN_CONFIG" "${TRAIN_OVERRIDES[@]}" output="$SCRATCH/backbone_only"

# ---------------------------------------------------------------------------------------------------------
# Summary

{
  echo "partialfc GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( SECONDS - START ))s of a ${BUDGET}s budget"
  [[ -f $LOGS/versions.log ]] && grep -E '^(gpu|torch|device|nvcc|compute-sanitizer|horovod|easydict):' \
    "$LOGS/versions.log"
  echo
  printf '%-22s %-26s %6s  %s\n' stage status wall_s "key figures"
  for row in "${ROWS[@]}"; do
    IFS='|' read -r name status wall figs <<<"$row"
    printf '%-22s %-26s %6s  %s\n' "$name" "$status" "$wall" "$figs"
  done
  train=$(grep -Eo 'speed [0-9.]+ samples/s' "$LOGS/train_head.log" 2>/dev/null | tail -1 | grep -Eo '[0-9.]+' \
            | head -1)
  alone=$(grep -E '^backbone only' "$LOGS/backbone_only.log" 2>/dev/null | grep -Eo '[0-9.]+ samples/s' \
            | grep -Eo '^[0-9.]+')
  if [[ -n ${train:-} && -n ${alone:-} ]]; then
    echo
    echo "training with the head: $train samples/s; backbone alone: $alone samples/s;" \
         "training / backbone = $(awk -v a="$train" -v b="$alone" 'BEGIN { printf "%.3f", a / b }')"
  fi
  for row in "${ROWS[@]}"; do
    IFS='|' read -r name status _ <<<"$row"
    if [[ $status == FAILED* || $status == TIMEOUT* ]]; then
      echo
      echo "--- logs/$name.log: its first error lines, then its last lines ---"
      grep -nE '(Error|Exception|FAILED|error:)' "$LOGS/$name.log" | head -n 15
      echo "..."
      tail -n 15 "$LOGS/$name.log"
    fi
  done
} >"$SUMMARY"

tar -czf "$OUTDIR/logs.tar.gz" -C "$OUTDIR" logs && rm -rf "$LOGS"
cat "$SUMMARY"
failed=0
for row in "${ROWS[@]}"; do
  IFS='|' read -r _ status _ <<<"$row"
  [[ $status == FAILED* || $status == TIMEOUT* ]] && failed=1
done
exit $failed
