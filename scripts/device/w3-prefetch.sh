#!/usr/bin/env bash
# One device call for the decode attention's L2 prefetch of o_proj's weights: W3 of every mode (the
# report run), the decode graph's A/B (with 'no-o-prefetch'), then the engine's greedy tokens against
# Hugging Face with the shipped graphs (batches of up to 8: PDL, so the prefetch runs). About 7 minutes.
#   run: bash scripts/device/w3-prefetch.sh [MODES]
set -uo pipefail
source scripts/device/steps.sh
modes="${1:-bf16,int4-torch,int4-triton-mma,int8,fp8}"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=12 step w3 220 python -m bench.quant --modes "$modes" --async-scheduling on --ppl-modes none --repeats 2 \
  --profile --json "$OUT/w3.json"
python - "$OUT/w3.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k, v in d["speed"].items():
    print(k, round(v["tok_s"], 1), "step", round(v["profile"]["wall_ms_per_step"], 3), "graph",
          round(v["profile"]["graph_replay_ms_per_step"], 3), "first tokens", v["first_tokens"])
PY
TAIL=22 step ab 150 python -m bench.decode_graph_ab --rounds 3 --json "$OUT/ab.json"
TAIL=6 step engine-check 90 python bench/engine_check.py --cases graphs
