#!/usr/bin/env bash
# Ring-memory inference measured against predicted on this machine (SE-MoE's ring, issue 7):
# cpu-moe-43m (172 MB of fp32 weights) on local-cpu-ring, one rank whose device arena holds
# 64 MiB. First the all-resident plan, which must not fit; then the ring of 12 sections (the next
# layer loading while one computes) and the naive alternative (load a layer, then compute it),
# alternating 3 times each, 2 batches per run (prefill 4 x 64 tokens, decode 16 tokens for 4
# sequences). Prints JSON: per plan the measured and predicted prefill, decode step, generated
# tokens/s, weight-copy time, stalls and the fraction of copy time hidden; the ring's speedup over
# the naive plan, measured and predicted. Asserts nothing.
#
#   bench/cpu_ring_inference.sh [BUILD_DIR]
set -euo pipefail
bench_ranks=1 bench_cluster=local-cpu-ring
source "$(dirname "$0")/cpu_bench_common.sh"
cat > "$work/resident.json" <<'JSON'
{"schema_version": 1, "name": "cpu-moe-43m-resident", "dp": 1,
 "for": {"model": "cpu-moe-43m", "cluster": "local-cpu-ring", "workload": "tiny-inference"}}
JSON
set +e
"$sy" run --plan "$work/resident.json" --steps 1 --warmup 0 --no-db > "$work/resident.out" 2>&1
resident_exit=$?
set -e
for i in 1 2 3; do
  for p in cpu-moe-43m-ring cpu-moe-43m-ring-naive; do
    "$sy" run --plan "$p" --steps 2 --warmup 1 --profile "$work/profile.json" --no-db --json \
      > "$work/$p-$i.json"
  done
done
python3 - "$work" "$resident_exit" <<'PY'
import glob, json, os, statistics, sys
work, resident_exit = sys.argv[1], int(sys.argv[2])
out = {"resident": {"exit_code": resident_exit,
                    "message": open(os.path.join(work, "resident.out")).read().strip()}}
keys = ("prefill_s", "decode_step_s", "latency_s", "generated_tokens_per_s", "weight_copy_s",
        "stall_s")
for p in ("cpu-moe-43m-ring", "cpu-moe-43m-ring-naive"):
    runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(work, p + "-[0-9].json")))]
    o = {"layers_ahead": runs[0]["ring"]["layers_ahead"],
         "peak_device_bytes": max(r["peak_bytes"]["gpu"] for r in runs),
         "weight_bytes": runs[0]["ring"]["weight_bytes"]}
    for k in keys:
        measured = statistics.median(r[k]["measured"] for r in runs)
        predicted = runs[0][k]["predicted"]
        o[k] = {"measured_runs": [r[k]["measured"] for r in runs], "measured": measured,
                "predicted": predicted, "error": predicted / measured - 1}
    o["copy_hidden_fraction"] = {
        "measured_runs": [r["copy_hidden_fraction"]["measured"] for r in runs],
        "measured": statistics.median(r["copy_hidden_fraction"]["measured"] for r in runs),
        "predicted": runs[0]["copy_hidden_fraction"]["predicted"]}
    out[p] = o
ring, naive = out["cpu-moe-43m-ring"], out["cpu-moe-43m-ring-naive"]
out["ring_speedup_generated_tokens_per_s"] = {
    "measured": ring["generated_tokens_per_s"]["measured"] /
                naive["generated_tokens_per_s"]["measured"],
    "predicted": ring["generated_tokens_per_s"]["predicted"] /
                 naive["generated_tokens_per_s"]["predicted"]}
out["ring_speedup_prefill"] = {
    "measured": naive["prefill_s"]["measured"] / ring["prefill_s"]["measured"],
    "predicted": naive["prefill_s"]["predicted"] / ring["prefill_s"]["predicted"]}
print(json.dumps(out, indent=2))
PY
