#!/usr/bin/env bash
# One device call: EngineConfig.decode_folds (fused_ops.fold_add_norm: residual add + RMSNorm in the
# int4 products; Attention.decode_rope: the rotary and cache write in the decode attention kernel),
# off by default until this run. The decode graph's variants A/B (bench/decode_graph_ab.py), W3's
# bf16 and int4 triton-mma rows without and with the folds, then our greedy tokens against HF's for
# tiny fp32 models (bench/engine_check.py, its graphs+folds case).
#   run: bash scripts/device/w3-fold.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=16 step ab 100 python -m bench.decode_graph_ab --rounds 5 --json "$OUT/ab.json"
w3="--async-scheduling on --ppl-modes none --repeats 2 --profile --skip-kernel-check"
TAIL=8 step w3 170 python -m bench.quant --modes bf16,int4-triton-mma $w3 --json "$OUT/w3.json"
TAIL=8 step w3-folds 100 python -m bench.quant --modes int4-triton-mma --decode-folds $w3 --skip-self-check \
  --json "$OUT/w3-folds.json"
grep -h "decode step at batch\|^speed\|tok/s" "$OUT"/w3*.log | tail -n 12
TAIL=10 step engine-check 90 python bench/engine_check.py
