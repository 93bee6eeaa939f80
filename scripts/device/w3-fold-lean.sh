#!/usr/bin/env bash
# w3-fold.sh cut to what a short device call fits: W3's bf16 and int4 triton-mma rows first (one
# repeat), then the decode graph's fold A/B (three rounds).
#   run: bash scripts/device/w3-fold-lean.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=12 step w3 150 python -m bench.quant --modes bf16,int4-triton-mma --async-scheduling on --ppl-modes none \
  --repeats 1 --profile --skip-kernel-check --json "$OUT/w3.json"
TAIL=16 step ab 90 python -m bench.decode_graph_ab --rounds 3 --json "$OUT/ab.json"
