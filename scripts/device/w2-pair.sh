#!/usr/bin/env bash
# One device call: the W2 report run (4 levels, 3 rounds, interleaved with the direct engine) as
# shipped, then the same run with extra app args, each against its own direct passes on this
# machine. Needs .raybundle carried. Logs and JSON go to $OUT.
#   run: bash scripts/device/w2-pair.sh env.RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 [CONCURRENCY]
set -uo pipefail
source scripts/device/steps.sh
variant="${1:?app args for the second run, e.g. gil_switch_interval_s=0.001}"
levels="${2:-1,16,64,256}"
with_ray || exit 1
run() {
  local name=$1 set=$2
  timeout 290 python bench/serve_throughput.py --concurrency "$levels" --interleave --rounds 3 \
    --serve-set "$set" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  echo "=== $name ($set): exit $?"
  grep -v "INFO\|WARNING\|raylet\|^\s*$" "$OUT/$name.log" | tail -n 22
}
run shipped ingress_direct_http.port=18000
run variant "ingress_direct_http.port=18000,$variant"
