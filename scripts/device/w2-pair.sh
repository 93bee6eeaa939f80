#!/usr/bin/env bash
# One device call: the W2 report run (levels interleaved with the direct engine, ROUNDS rounds) as
# shipped, then the same run once per variant of app args, each against its own direct passes on
# this machine. Needs .raybundle carried. Logs and JSON go to $OUT. About 200 s a run at 4 levels:
# with two variants, keep LEVELS to three (the call's limit is 600 s).
#   run: bash scripts/device/w2-pair.sh env.RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 [ingress.num_replicas=2 ...]
#        LEVELS=16,64,256 ROUNDS=3 bash scripts/device/w2-pair.sh ...
set -uo pipefail
source scripts/device/steps.sh
[ $# -ge 1 ] || { echo "app args for at least one variant, e.g. gil_switch_interval_s=0.001"; exit 2; }
levels="${LEVELS:-1,16,64,256}"
rounds="${ROUNDS:-3}"
with_ray || exit 1
run() {
  local name=$1 set=$2
  timeout 290 python bench/serve_throughput.py --concurrency "$levels" --interleave --rounds "$rounds" \
    --serve-set "$set" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  echo "=== $name ($set): exit $?"
  grep -v "INFO\|WARNING\|raylet\|^\s*$" "$OUT/$name.log" | tail -n 22
}
run shipped ingress_direct_http.port=18000
i=0
for variant in "$@"; do
  i=$((i + 1))
  run "variant$i" "ingress_direct_http.port=18000,$variant"
done
