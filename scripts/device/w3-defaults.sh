#!/usr/bin/env bash
# One device call for the decode graph as now shipped (decode_folds on, attention's splits combined by
# a kernel of their own): W3 of every mode (the report run, with the int4 self-check), the same-process
# A/B of the graph's variants, the engine's greedy tokens against Hugging Face (folded and unfolded
# graphs), then W1 without its peers. Logs and JSON go to $OUT. About 7 minutes.
#   run: bash scripts/device/w3-defaults.sh [MODES]
set -uo pipefail
source scripts/device/steps.sh
modes="${1:-bf16,int4-torch,int4-triton-mma,int8,fp8}"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
w3_report 200 "$modes"
TAIL=14 step fold-ab 130 python -m bench.decode_graph_ab --rounds 3 --json "$OUT/fold-ab.json"
TAIL=10 step engine-check 130 python bench/engine_check.py --cases graphs,graphs-unfolded,steps+folds+preempt
TAIL=8 step w1 100 python -m bench.throughput --peers none --variants graphs-async --json "$OUT/w1.json"
