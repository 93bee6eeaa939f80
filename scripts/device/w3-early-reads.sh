#!/usr/bin/env bash
# One device call for decode attention's reads before its PDL wait (its step inputs, and an L2
# prefetch of its first keys and values), the split combine's loads side by side and gate_up's plain
# product then the SiLU kernel: W3 of bf16 and int4 (the report's pair), the engine's greedy tokens
# against Hugging Face (the decode graphs), then the decode graph's same-process A/B (with
# 'attn-late-reads', the order before) if the call's time allows. About 5 minutes.
#   run: bash scripts/device/w3-early-reads.sh [MODES]
set -uo pipefail
source scripts/device/steps.sh
modes="${1:-bf16,int4-triton-mma}"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=24 step w3 170 python -m bench.quant --modes "$modes" --async-scheduling on --ppl-modes none --repeats 2 \
  --profile --json "$OUT/w3.json"
python - "$OUT/w3.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k, v in d["speed"].items():
    print(k, round(v["tok_s"], 1), "step", round(v["profile"]["wall_ms_per_step"], 3), "graph",
          round(v["profile"]["graph_replay_ms_per_step"], 3), "first tokens", v["first_tokens"])
PY
TAIL=10 step engine-check 90 python bench/engine_check.py --cases graphs
TAIL=20 step graph-ab 150 python -m bench.decode_graph_ab --rounds 2 --json "$OUT/graph-ab.json"
