#!/usr/bin/env bash
# One device call: the engine's greedy tokens against Hugging Face's (every case, timed), then the
# W2 report run through Ray Serve. Needs .raybundle carried. Logs and JSON go to $OUT.
#   run: bash scripts/device/check-w2.sh
set -uo pipefail
source scripts/device/steps.sh
t0=$(date +%s)
timeout 300 python bench/engine_check.py >"$OUT/engine-check.log" 2>&1
echo "engine-check: exit $? after $(( $(date +%s) - t0 )) s"
grep "equal to HF\|differ\|Error" "$OUT/engine-check.log" | tail -n 20
with_ray || exit 1
timeout 270 python bench/serve_throughput.py --concurrency 1,16,64,256 --interleave --rounds 3 \
  --serve-set ingress_direct_http.port=18000 --json "$OUT/w2.json" >"$OUT/w2.log" 2>&1
echo "w2: exit $?"
grep -v "INFO\|WARNING\|raylet\|^\s*$" "$OUT/w2.log" | tail -n 40
