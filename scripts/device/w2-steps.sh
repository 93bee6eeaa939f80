#!/usr/bin/env bash
# One device call: the W2 report run (levels interleaved with the direct engine) with one decode step
# per launch (as shipped), then with EngineConfig.num_scheduler_steps = K for both paths, each against
# its own direct passes. Needs .raybundle carried. About 200 s a run at three levels.
#   run: STEPS=8 LEVELS=16,64,256 ROUNDS=2 bash scripts/device/w2-steps.sh
set -uo pipefail
source scripts/device/steps.sh
levels="${LEVELS:-16,64,256}"
rounds="${ROUNDS:-2}"
with_ray || exit 1
run() {
  local name=$1 app=$2
  timeout 290 python bench/serve_throughput.py --concurrency "$levels" --interleave --rounds "$rounds" \
    --app-set "$app" --serve-set ingress_direct_http.port=18000 --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  echo "=== $name ($app): exit $?"
  grep -v "INFO\|WARNING\|raylet\|^\s*$" "$OUT/$name.log" | tail -n 22
}
for k in ${STEPS_LIST:-1 ${STEPS:-8}}; do
  run "steps$k" "num_scheduler_steps=$k"
done
