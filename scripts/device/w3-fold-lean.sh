#!/usr/bin/env bash
# w3-fold.sh cut to what a short device call fits: the decode graph's fold A/B (three rounds, with
# the folded logits against the unfolded), then W3's int4 triton-mma row with the folds (one repeat).
#   run: bash scripts/device/w3-fold-lean.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=16 step ab 90 python -m bench.decode_graph_ab --rounds 3 --json "$OUT/ab.json"
TAIL=12 step w3-folds 120 python -m bench.quant --modes int4-triton-mma --decode-folds --async-scheduling on \
  --ppl-modes none --repeats 1 --profile --skip-kernel-check --json "$OUT/w3-folds.json"
