#!/usr/bin/env bash
# Predicted against measured step time on this machine: calibrate the CPU backend on 2 ranks
# (one per core), run 6 data/expert-parallel plans of tiny-moe on 2 ranks (local-cpu --gpus 2,
# tiny-train: 8 sequences of 128 tokens), and print `switchyard compare --json` with the median
# absolute error, and the same for the predictions given each run's measured routing. Prints JSON;
# asserts nothing (the issue's target: median |error| <= 15%). Shared or noisy hosts move the
# measurements by tens of percent between minutes: run it on a quiet machine.
#
#   bench/cpu_prediction_accuracy.sh [BUILD_DIR]
set -euo pipefail
source "$(dirname "$0")/cpu_bench_common.sh"
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
    --plan "$work/$p.json" --steps 9 --warmup 1 --profile "$work/profile.json" \
    --db "$work/s.db" --json > "$work/run-$p.json"
done
# The stored comparison (the prediction for the workload as declared: uniform routing), and
# beside it each run's prediction given the routing it measured layer by layer (an untrained
# router is not balanced; each MoE layer waits for its most loaded EP rank).
"$sy" compare --json --db "$work/s.db" > "$work/compare.json"
python3 - "$work" <<'PY'
import glob, json, os, sys
work = sys.argv[1]
rows = json.load(open(os.path.join(work, "compare.json")))
runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(work, "run-*.json")))]
routed = []
for r in runs:
    m, p = r["median_step_time_s"], r["predicted_step_time_with_measured_routing_s"]
    routed.append({"plan": r["plan"]["name"], "measured_step_s": m,
                   "predicted_step_s_with_measured_routing": p, "error": p / m - 1})
def median_abs(xs):
    xs = sorted(abs(x) for x in xs)
    return xs[len(xs) // 2]
print(json.dumps({"runs": rows, "with_measured_routing": routed,
                  "median_abs_step_time_error": median_abs(r["step_time_error"] for r in rows),
                  "median_abs_step_time_error_with_measured_routing":
                      median_abs(r["error"] for r in routed),
                  "target": 0.15}, indent=2))
PY
