#!/usr/bin/env bash
# One device call at the session's last build: W4 (the bundled pair, plain and draft:2, batch 1 and 16, temperatures 0
# and 0.8, with decode_folds on now: the draft's small passes rotate inside attention), then the W2 report
# run (levels interleaved with the direct engine). Needs .raybundle carried. About 7 minutes.
#   run: bash scripts/device/w4-w2-final.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=16 step w4 200 python bench/speculative.py --variants none,draft:2 --runs 2 --json "$OUT/w4.json"
with_ray || exit 1
timeout 230 python bench/serve_throughput.py --concurrency 16,64,256 --interleave --rounds 2 \
  --serve-set ingress_direct_http.port=18000 --json "$OUT/w2.json" >"$OUT/w2.log" 2>&1
echo "=== w2: exit $?"
grep -v "INFO\|WARNING\|raylet\|nanobind\|leaked\|^\s*$" "$OUT/w2.log" | tail -n 24
