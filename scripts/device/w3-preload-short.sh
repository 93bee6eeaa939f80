#!/usr/bin/env bash
# The shortest call for decode attention's preload (see w3-preload.sh): the decode graph's
# same-process A/B of the four variants first, then W3 of bf16 and int4 (the report's command)
# under whichever variant the A/B found fastest, or as shipped if none beat it. About 4 minutes.
#   run: bash scripts/device/w3-preload-short.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
preload_ab 130
best=$(ab_winner)
echo "=== W3 under: $best"
run=(python -m bench.with_variant "$best" bench.quant)
[ "$best" = shipped ] && run=(python -m bench.quant)
TAIL=24 step w3 130 "${run[@]}" --modes bf16,int4-triton-mma \
  --async-scheduling on --ppl-modes none --repeats 2 --profile --json "$OUT/w3.json"
