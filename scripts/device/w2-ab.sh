#!/usr/bin/env bash
# One device call: W2 with Serve twice, as shipped and with extra app args, between two direct passes,
# so one machine gives both ratios. Needs .raybundle carried. Log and JSON go to $OUT.
#   run: bash scripts/device/w2-ab.sh gil_switch_interval_s=0.0005 [CONCURRENCY]
set -uo pipefail
source scripts/device/steps.sh
variant="${1:?app args for the second Serve pass, e.g. gil_switch_interval_s=0.0005}"
levels="${2:-16,64,256}"
with_ray || exit 1
timeout 540 python bench/serve_throughput.py --concurrency "$levels" --direct-twice \
  --serve-set ingress_direct_http.port=18000 --serve-set "ingress_direct_http.port=18000,$variant" \
  --json "$OUT/w2-ab.json" >"$OUT/w2-ab.log" 2>&1
echo "exit $?"
grep -v "INFO\|WARNING\|raylet\|^\s*$" "$OUT/w2-ab.log" | tail -n 60
