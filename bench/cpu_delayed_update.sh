#!/usr/bin/env bash
# ZeRO-Offload's delayed update, measured against predicted on this machine: cpu-moe-43m on one
# rank (local-cpu, --gpus 1: the rank's compute on one core, the host's Adam free to use another)
# with Adam's states in host memory, the host's update inside the step or delayed (beside the next
# step), alternating 3 times each, 3 steps per run. Prints JSON: per plan the measured and
# predicted step time and the host update's time; the delayed plan's speedup measured and
# predicted. Asserts nothing.
#
#   bench/cpu_delayed_update.sh [BUILD_DIR]
set -euo pipefail
bench_ranks=1
source "$(dirname "$0")/cpu_bench_common.sh"
for p in sync delayed; do
  delayed=$([ "$p" = delayed ] && echo true || echo false)
  cat > "$work/$p.json" <<JSON
{"schema_version": 1, "name": "cpu-moe-43m-states-on-host-$p", "dp": 1,
 "placement": {"optimizer_states": "cpu"}, "delayed_update": $delayed}
JSON
done
for i in 1 2 3; do
  for p in sync delayed; do
    "$sy" run --model cpu-moe-43m --cluster local-cpu --gpus 1 --workload tiny-train \
      --plan "$work/$p.json" --steps 3 --warmup 1 --profile "$work/profile.json" --no-db \
      --json > "$work/$p-$i.json"
    "$sy" simulate --model cpu-moe-43m --cluster local-cpu --gpus 1 --workload tiny-train \
      --plan "$work/$p.json" --profile "$work/profile.json" --json > "$work/$p-sim.json"
  done
done
python3 - "$work" <<'PY'
import glob, json, os, statistics, sys
work = sys.argv[1]
out = {}
for p in ("sync", "delayed"):
    runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(work, p + "-[0-9].json")))]
    sim = json.load(open(os.path.join(work, p + "-sim.json")))
    def measured_update(r):
        return sum(o.get("measured_s") or 0 for o in r["program_ops"]
                   if o.get("op") == "optimizer" and o.get("phase") == "step")
    out[p] = {
        "plan": runs[0]["plan"]["name"],
        "measured_step_s": [r["median_step_time_s"] for r in runs],
        "predicted_step_s": runs[0]["predicted_step_time_s"],
        "host_update_s": {"measured": statistics.median(measured_update(r) for r in runs),
                          "predicted": sim["delayed_update_s"] or sim["time_breakdown"]["optimizer_s"]},
        "exposed_optimizer_s_predicted": sim["time_breakdown"]["optimizer_s"],
    }
m = {p: statistics.median(out[p]["measured_step_s"]) for p in ("sync", "delayed")}
for p in ("sync", "delayed"):
    out[p]["step_time_error"] = out[p]["predicted_step_s"] / m[p] - 1
out["speedup_delayed_measured"] = m["sync"] / m["delayed"]
out["speedup_delayed_predicted"] = out["sync"]["predicted_step_s"] / out["delayed"]["predicted_step_s"]
print(json.dumps(out, indent=2))
PY
