#!/usr/bin/env bash
# One device call: the int4 norm folding (fused_ops.fold_add_norm) at batch 1 on the 8B shape. The
# decode graph's variants A/B (bench/decode_graph_ab.py: shipped = folded, unfolded, no-norm, ...),
# then W3's bf16 and int4 triton-mma rows (the report's ratio) on the same machine.
#   run: bash scripts/device/w3-fold.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=14 step ab 150 python -m bench.decode_graph_ab --rounds 5 --json "$OUT/ab.json"
TAIL=12 step w3 200 python -m bench.quant --modes bf16,int4-triton-mma --async-scheduling on --ppl-modes none \
  --repeats 2 --profile --skip-kernel-check --json "$OUT/w3.json"
grep -h "decode step at batch\|^speed\|self-check\|tok/s" "$OUT"/w3.log | tail -n 12
