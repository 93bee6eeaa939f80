#!/usr/bin/env bash
# One device call: the decode graph's A/B at batch 1 on the 8B shape in int4 (the shipped graph, its
# folds, attention's split policy, a graph without attention), then the chained speculative steps
# against synchronous ones with the shipped defaults (decode_folds on). About 5 minutes.
#   run: bash scripts/device/attn-ab-chain.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=22 step ab 200 python -m bench.decode_graph_ab --rounds 3 --json "$OUT/ab.json"
TAIL=14 step chain-check 150 python bench/spec_chain_check.py
