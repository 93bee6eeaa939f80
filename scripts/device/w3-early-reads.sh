#!/usr/bin/env bash
# One device call for decode attention's reads before its PDL wait (its step inputs, and an L2
# prefetch of its first keys and values) and the split combine's loads side by side: the engine's
# greedy tokens against Hugging Face (the decode graphs, chunked prefill with preemption), W3 of every
# mode (the report run), the decode graph's same-process A/B (with 'attn-late-reads', the order
# before), then the chained speculative steps (their verify pass reads the same way). About 8 minutes.
#   run: bash scripts/device/w3-early-reads.sh [MODES]
set -uo pipefail
source scripts/device/steps.sh
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
# W3's report runs are on the H100; elsewhere (an H200) bf16 and int4 only.
case "$gpu" in *H100*) default=bf16,int4-triton-mma ;; *) default=bf16,int4-triton-mma ;; esac
modes="${1:-$default}"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=10 step engine-check 110 python bench/engine_check.py --cases graphs,steps+folds+preempt
[ "$modes" = none ] || TAIL=24 step w3 210 python -m bench.quant --modes "$modes" --async-scheduling on --ppl-modes none --repeats 2 \
  --profile --json "$OUT/w3.json"
[ "$modes" = none ] || python - "$OUT/w3.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k, v in d["speed"].items():
    print(k, round(v["tok_s"], 1), "step", round(v["profile"]["wall_ms_per_step"], 3), "graph",
          round(v["profile"]["graph_replay_ms_per_step"], 3), "first tokens", v["first_tokens"])
PY
TAIL=20 step graph-ab 150 python -m bench.decode_graph_ab --rounds 3 --json "$OUT/graph-ab.json"
TAIL=12 step spec-chain 70 python bench/spec_chain_check.py
