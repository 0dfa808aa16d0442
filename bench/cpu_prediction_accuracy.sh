#!/usr/bin/env bash
# Predicted against measured step time on this machine: calibrate the CPU backend on 2 ranks
# (one per core), run 6 data/expert-parallel plans of tiny-moe on 2 ranks (local-cpu --gpus 2,
# tiny-train: 8 sequences of 128 tokens), and print `switchyard compare --json` with the median
# absolute error. Prints JSON; asserts nothing (the issue's target: median |error| <= 15%).
#
#   bench/cpu_prediction_accuracy.sh [BUILD_DIR]
set -euo pipefail
build=${1:-$(cd "$(dirname "$0")/.." && pwd)/build}
sy="$build/tools/switchyard"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi="mpiexec -n 2"
$mpi "$sy" calibrate --gpus 2 --out "$work/profile.json" --db "$work/s.db" > "$work/calibrate.txt"
plan() {  # name ep zero micro_batch_size bucket_bytes
  cat > "$work/$1.json" <<JSON
{"schema_version": 1, "name": "$1", "dp": 2, "ep": $2, "zero_stage": $3,
 "micro_batch_size": $4, "grad_bucket_bytes": $5, "dispatch": "all_to_all", "schedule": "1f1b"}
JSON
}
plan dp2-zero0-mbs1 1 0 1 25000000
plan dp2-zero1-mbs1 1 1 1 25000000
plan dp2-zero0-mbs4 1 0 4 25000000
plan dp2-ep2-zero0-mbs1 2 0 1 25000000
plan dp2-ep2-zero1-mbs2 2 1 2 25000000
plan dp2-ep2-zero1-mbs4-bucket1M 2 1 4 1000000
for p in dp2-zero0-mbs1 dp2-zero1-mbs1 dp2-zero0-mbs4 dp2-ep2-zero0-mbs1 dp2-ep2-zero1-mbs2 \
         dp2-ep2-zero1-mbs4-bucket1M; do
  $mpi "$sy" run --model tiny-moe --cluster local-cpu --gpus 2 --workload tiny-train \
    --plan "$work/$p.json" --steps 5 --warmup 1 --profile "$work/profile.json" \
    --db "$work/s.db" > /dev/null
done
"$sy" compare --json --db "$work/s.db" | python3 -c '
import json, sys
rows = json.load(sys.stdin)
errors = sorted(abs(r["step_time_error"]) for r in rows)
print(json.dumps({"runs": rows, "median_abs_step_time_error": errors[len(errors) // 2],
                  "target": 0.15}, indent=2))'
