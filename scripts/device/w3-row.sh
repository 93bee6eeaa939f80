#!/usr/bin/env bash
# One device call for the measured int4 tables (engine/quant/int4_tuned.py): the batch-1 sweep of
# both int4 mma kernels on cold weights writes this GPU's table, then W3 with it and W3 with the
# autotuner instead (ENGINE_INT4_TUNED=0), one after the other. Logs, JSON and the table go to $OUT.
#   run: bash scripts/device/w3-row.sh [MODES]
set -uo pipefail
source scripts/device/steps.sh
modes="${1:-bf16,int4-torch,int4-triton-mma,int8}"
python -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__, torch.version.cuda)"
TAIL=75 step sweep 300 python -m bench.int4_mma_sweep --kernel both --write-table --top 4 --json "$OUT/sweep.json"
cp engine/quant/tuned/*.json "$OUT/" 2>/dev/null
w3="--async-scheduling on --ppl-modes none --repeats 2 --profile"
TAIL=12 step w3-table 170 python -m bench.quant --modes "$modes" $w3 --json "$OUT/w3-table.json"
ENGINE_INT4_TUNED=0 TAIL=12 step w3-autotuned 100 python -m bench.quant --modes int4-triton-mma $w3 --json "$OUT/w3-autotuned.json"
