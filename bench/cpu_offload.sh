#!/usr/bin/env bash
# SE-MoE's 2D prefetch in training, measured against predicted on this machine: tiny-moe on one
# rank (local-cpu, --gpus 1) with the dense parameters and Adam's states in host memory and the
# experts on SSD files, prefetching down the levels only (SSD reads 2 layers ahead, each copy to the
# device right before use) or in two dimensions (SSD reads 4 ahead, copies to the device 2 ahead),
# alternating 3 times each, 3 steps per run. Prints JSON:
# per plan the measured and predicted step time, fetch time, stalls and the fraction of fetch time
# hidden behind compute; the 2D plan's speedup measured and predicted. Asserts nothing.
#
#   bench/cpu_offload.sh [BUILD_DIR]
set -euo pipefail
bench_ranks=1
source "$(dirname "$0")/cpu_bench_common.sh"
for p in down 2d; do
  depth=2  # "down": SSD reads 2 ahead, copies at use; "2d": reads 4 ahead, copies 2 ahead
  cat > "$work/$p.json" <<JSON
{"schema_version": 1, "name": "tiny-moe-offload-$p", "dp": 1,
 "placement": {"dense_params": "cpu", "expert_params": "ssd", "optimizer_states": "cpu"},
 "prefetch": {"depth": $depth, "direction": "$p"}}
JSON
done
for i in 1 2 3; do
  for p in down 2d; do
    "$sy" run --model tiny-moe --cluster local-cpu --gpus 1 --workload tiny-train \
      --plan "$work/$p.json" --steps 3 --warmup 1 --profile "$work/profile.json" --no-db \
      --json > "$work/$p-$i.json"
  done
done
python3 - "$work" <<'PY'
import glob, json, os, statistics, sys
work = sys.argv[1]
out = {}
for p in ("down", "2d"):
    runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(work, p + "-[0-9].json")))]
    t = [r["tiers"] for r in runs]
    out[p] = {
        "plan": runs[0]["plan"]["name"],
        "measured_step_s": [r["median_step_time_s"] for r in runs],
        "predicted_step_s": runs[0]["predicted_step_time_s"],
        "fetch_s": {"measured": statistics.median(x["copy_s"]["measured"] for x in t),
                    "predicted": t[0]["copy_s"]["predicted"]},
        "stall_s": {"measured": statistics.median(x["stall_s"]["measured"] for x in t),
                    "predicted": t[0]["stall_s"]["predicted"]},
        "fetch_hidden_fraction": {
            "measured_runs": [x["copy_hidden_fraction"]["measured"] for x in t],
            "predicted": t[0]["copy_hidden_fraction"]["predicted"]},
        "check_peak_bytes": runs[0]["peak_bytes"],
    }
m = {p: statistics.median(out[p]["measured_step_s"]) for p in ("down", "2d")}
for p in ("down", "2d"):
    out[p]["step_time_error"] = out[p]["predicted_step_s"] / m[p] - 1
out["speedup_2d_measured"] = m["down"] / m["2d"]
out["speedup_2d_predicted"] = out["down"]["predicted_step_s"] / out["2d"]["predicted_step_s"]
print(json.dumps(out, indent=2))
PY
