#!/usr/bin/env bash
# The CUDA backend on the GPU host in hand, stage by stage; every stage's output goes to $OUT.
#
#   bench/gpu_validate.sh [STAGE...]     (default: every stage, in this order)
#
# Logs go to gpu-results/ (LOG=DIR to change); where $OUT is set (the device machine's result
# folder) they end up packed in $OUT/gpu-results.tgz. Each command gets STEP_TIMEOUT seconds
# (default 300).
#
# Stages:
#   build      unpack .gpu-host-debs (../shared/tools/fetch-gpu-host-debs fills it; a host without a
#              package registry) under /opt/syard-deps and build with CUDA, without MPI (one GPU is
#              world size 1) into build-gpu/
#   test       the CUDA tests: every Device op against the CPU backend, NCCL on one rank
#   check      numerics of whole runs against the CPU backend's one-process reference: tiny-moe
#              training (fp32 and bf16 GEMMs; with parameters, gradients and Adam off the GPU)
#              and cpu-moe-43m ring inference
#   bench      grouped expert GEMM vs one cuBLAS GEMM of the same FLOPs; copy/compute overlap
#   calibrate  switchyard calibrate --backend cuda of one H100 (profile for the runs below)
#   train      gpu-moe-1.2b, one training step on one GPU: measured vs predicted (datasheet
#              profile and calibrated profile)
#   ring       gpu-moe-1.2b served by a GPU treated as 4 GiB: ring vs load-then-compute, measured
#              vs predicted
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
LOG=${LOG:-$root/gpu-results}
mkdir -p "$LOG"
step_timeout=${STEP_TIMEOUT:-300}
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build test check bench calibrate train ring)
deps=/opt/syard-deps
export LD_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
sy=build-gpu/tools/switchyard
profile="$LOG/h100-profile.json"
status=0

stage() { echo "=== $1 ($(date +%T))"; }
run() {  # run NAME CMD...: output to $LOG/NAME.txt and the console's tail
  local name=$1
  shift
  timeout "$step_timeout" "$@" >"$LOG/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$LOG/$name.txt"
  echo "--- $name: exit $rc"
  [ $rc -eq 0 ] || status=1
  return $rc
}
report() {  # report NAME CMD...: as run, for a figure to read rather than a check to pass
  local keep=$status
  run "$@"
  local rc=$?
  status=$keep
  return $rc
}

for s in "${stages[@]}"; do
  case "$s" in
    build)
      stage build
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      nvcc --version | tail -2
      mkdir -p "$deps"
      for f in .gpu-host-debs/*.deb; do dpkg -x "$f" "$deps"; done
      run configure cmake -S . -B build-gpu -G Ninja -DCMAKE_PREFIX_PATH="$deps/usr" \
        -DSWITCHYARD_WITH_MPI=OFF -DSWITCHYARD_WITH_CUDA=ON || break
      run build ninja -C build-gpu switchyard cuda_tests cuda_executor_bench || break
      ;;
    test)
      stage test
      run cuda_tests build-gpu/tests/cuda_tests
      ;;
    check)
      stage check
      run check_tiny_fp32 $sy run --backend cuda --plan tiny-moe-1gpu --steps 3 --check --no-db
      # bf16 products are not meant to pass fp32's 1e-4: the JSON reports their error.
      report check_tiny_bf16 $sy run --backend cuda --gemm-math bf16 --plan tiny-moe-1gpu --steps 3 \
        --check --no-db --json
      run check_offload $sy run --backend cuda --plan tiny-moe-offload-1gpu --steps 3 --check --no-db
      run check_ring $sy run --backend cuda --plan cpu-moe-43m-ring --cluster h100-sxm-1gpu-4gib \
        --check --no-db
      ;;
    bench)
      stage bench
      run cuda_executor_bench build-gpu/bench/cuda_executor_bench
      ;;
    calibrate)
      stage calibrate
      run calibrate $sy calibrate --backend cuda --cluster h100-sxm-1gpu --out "$profile" --no-db
      ;;
    train)
      stage train
      # Without this run's calibration, the bundled one of the lent H100.
      [ -f "$profile" ] || profile=configs/profiles/h100-sxm-cuda-fp32.json
      run train_datasheet $sy run --backend cuda --plan gpu-moe-1.2b-1gpu --steps 3 --no-db --json
      [ -f "$profile" ] && run train_calibrated $sy run --backend cuda --plan gpu-moe-1.2b-1gpu \
        --steps 3 --no-db --profile "$profile" --json
      ;;
    ring)
      stage ring
      [ -f "$profile" ] || profile=configs/profiles/h100-sxm-cuda-fp32.json
      p=()
      [ -f "$profile" ] && p=(--profile "$profile")
      run ring $sy run --backend cuda --plan gpu-moe-1.2b-ring --steps 2 --no-db "${p[@]}"
      run ring_naive $sy run --backend cuda --plan gpu-moe-1.2b-ring-naive --steps 2 --no-db \
        "${p[@]}"
      ;;
    *)
      echo "unknown stage $s (see the header)" >&2
      exit 2
      ;;
  esac
done
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu-results.tgz" -C "$(dirname "$LOG")" "$(basename "$LOG")"
fi
exit $status
