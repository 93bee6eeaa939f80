#!/usr/bin/env bash
# One device call for decode attention's first tile of keys and values read before its PDL wait
# (_DECODE_PRELOAD, off as shipped; with 256-token tiles a context up to 256 is one program a KV head
# and needs no combine kernel): W3 of bf16 and int4 as shipped, the decode graph's same-process A/B
# (attn-wide, attn-preload, attn-1x256 and mma-no-split, the int4 products without split-K, beside the
# shipped graph), then W3's int4 run again under whichever of those four the A/B found fastest, if any
# beat the shipped graph; then the engine's greedy tokens
# against Hugging Face with the decode graphs. About 9 minutes; AB_ROUNDS=2 CHECK=0 for about 7.
#   run: bash scripts/device/w3-preload.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
w3_report 150 bf16,int4-triton-mma
AB_ROUNDS="${AB_ROUNDS:-3}" preload_ab 200
best=$(ab_winner)
echo "=== fastest variant ahead of shipped: $best"
if [ "$best" != shipped ]; then
  TAIL=16 step w3-variant 110 python -m bench.with_variant "$best" bench.quant --modes int4-triton-mma \
    --async-scheduling on --ppl-modes none --repeats 2 --profile --skip-kernel-check --json "$OUT/w3-variant.json"
fi
[ "${CHECK:-1}" = 0 ] || TAIL=10 step engine-check 90 python bench/engine_check.py --cases graphs
