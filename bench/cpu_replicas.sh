#!/usr/bin/env bash
# Elastic expert replicas measured against predicted on this machine: calibrate the CPU backend on
# the ranks the runs use, then run tiny-moe dpR epR (R = $RANKS ranks, default 2; 4 oversubscribes
# the 2 cores) on a zipf(1.2)-skewed workload (the gate samples the experts in those proportions)
# without and with 2 copies of the 2 hottest experts, alternating the two plans 3 times each.
# Prints JSON: each run's measured median step time, the prediction for the workload and the one
# given the routing measured, and the speedup of replication measured and predicted. Asserts
# nothing.
#
#   [RANKS=4] bench/cpu_replicas.sh [BUILD_DIR]
set -euo pipefail
R=${RANKS:-2}
bench_ranks=$R
source "$(dirname "$0")/cpu_bench_common.sh"
cat > "$work/zipf.json" <<'JSON'
{"schema_version": 1, "name": "tiny-train-zipf", "mode": "train", "global_batch_size": 8,
 "seq_len": 128, "precision": "fp32", "routing": {"kind": "zipf", "exponent": 1.2}}
JSON
cat > "$work/plain.json" <<JSON
{"schema_version": 1, "name": "dp$R-ep$R", "dp": $R, "ep": $R, "zero_stage": 1,
 "dispatch": "all_to_all"}
JSON
cat > "$work/replicas.json" <<JSON
{"schema_version": 1, "name": "dp$R-ep$R-2hot-x2", "dp": $R, "ep": $R, "zero_stage": 1,
 "dispatch": "all_to_all", "expert_replicas": {"hot_experts": 2, "replicas": 2}}
JSON
export OMPI_MCA_rmaps_base_oversubscribe=1
for i in 1 2 3; do
  for p in plain replicas; do
    mpiexec -n "$R" "$sy" run --model tiny-moe --cluster local-cpu --gpus "$R" \
      --workload "$work/zipf.json" \
      --plan "$work/$p.json" --steps 7 --warmup 1 --profile "$work/profile.json" --no-db \
      --json > "$work/$p-$i.json"
  done
done
python3 - "$work" <<'PY'
import glob, json, os, statistics, sys
work = sys.argv[1]
out = {}
for p in ("plain", "replicas"):
    runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(work, p + "-*.json")))]
    out[p] = {
        "plan": runs[0]["plan"]["name"],
        "measured_step_s": [r["median_step_time_s"] for r in runs],
        "predicted_step_s": runs[0]["predicted_step_time_s"],
        "predicted_with_measured_routing_s":
            [r["predicted_step_time_with_measured_routing_s"] for r in runs],
        "tokens_per_expert": runs[0]["tokens_per_expert"],
    }
m = {p: statistics.median(out[p]["measured_step_s"]) for p in out}
out["speedup_measured"] = m["plain"] / m["replicas"]
out["speedup_predicted"] = out["plain"]["predicted_step_s"] / out["replicas"]["predicted_step_s"]
print(json.dumps(out, indent=2))
PY
