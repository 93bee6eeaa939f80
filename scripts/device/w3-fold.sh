#!/usr/bin/env bash
# One device call: the batch-1 folds (fused_ops.fold_add_norm: residual add + RMSNorm in the int4
# products; Attention.decode_rope: the rotary and cache write in the decode attention kernel). The
# decode graph's variants A/B (bench/decode_graph_ab.py), W3's bf16 and int4 triton-mma rows, then our
# greedy tokens against HF's for tiny models (the rotary fold is on in their decode steps).
#   run: bash scripts/device/w3-fold.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=16 step ab 100 python -m bench.decode_graph_ab --rounds 5 --json "$OUT/ab.json"
TAIL=12 step w3 170 python -m bench.quant --modes bf16,int4-triton-mma --async-scheduling on --ppl-modes none \
  --repeats 2 --profile --skip-kernel-check --json "$OUT/w3.json"
grep -h "decode step at batch\|^speed\|self-check\|tok/s" "$OUT"/w3.log | tail -n 12
TAIL=8 step engine-check 60 python bench/engine_check.py
