#!/usr/bin/env bash
# One device call: W4 with the fused norm-linear default (the unfused and remote-draft variants
# beside it), then W2 at 1-256 streams with the event-loop lag of the LLM and ingress replicas and
# py-spy of both. Needs .raybundle and .whl (py-spy) carried. Logs and JSON go to $OUT.
#   run: bash scripts/device/w4-w2-lag.sh   (SKIP_W4=1: W2 only; W2_SET=k=v,...: more --serve-set items)
set -uo pipefail
source scripts/device/steps.sh
with_ray || exit 1
pip install -q --no-index --no-deps --target /tmp/spy .whl/py_spy-*.whl 2>&1 | grep -v WARNING; ls /tmp/spy/bin
export PATH="/tmp/spy/bin:$PATH"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
[ -n "${SKIP_W4:-}" ] || TAIL=30 step w4 300 python bench/speculative.py \
  --variants none,none-sync,none+fused,draft:2,draft-sync:2,draft:2+unfused,remote:2 --runs 3 --json "$OUT/w4.json"
bash scripts/device/spy.sh 'ServeReplica:llm:LLMServer' 40 40 "$OUT/spy-llm.txt" >"$OUT/spy-llm.log" 2>&1 &
bash scripts/device/spy.sh 'ServeReplica:llm:OpenAIIngress' 40 40 "$OUT/spy-ingress.txt" >"$OUT/spy-ingress.log" 2>&1 &
TAIL=60 step w2 400 python bench/serve_throughput.py --concurrency 1,16,64,256 --interleave --rounds 3 \
  --serve-set "ingress_direct_http.port=18000${W2_SET:+,$W2_SET}" --json "$OUT/w2.json"
wait
cat "$OUT"/spy-*.log
tar -czf "$OUT/spy.tgz" -C "$OUT" $(cd "$OUT" && ls spy-* 2>/dev/null) && rm -f "$OUT"/spy-*
