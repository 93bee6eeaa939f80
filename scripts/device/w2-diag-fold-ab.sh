#!/usr/bin/env bash
# One device call: the W2 report run with the engine's step counters and the replicas' garbage
# collections in its output (why the Serve path's engine batch is smaller than the direct one's), then
# the decode graph's fold A/B at batch 1 on the 8B shape (one process, same kernel configs).
# Needs .raybundle carried. About 6-7 minutes.
#   run: LEVELS=16,64,256 ROUNDS=2 bash scripts/device/w2-diag-fold-ab.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
with_ray || exit 1
w2_report 330 40
TAIL=16 step fold-ab 150 python -m bench.decode_graph_ab --rounds 3 --json "$OUT/fold-ab.json"
