#!/usr/bin/env bash
# One device call for programmatic dependent launch (engine/pdl.py): the norm + int4 product pairs
# with and without it (bench/pdl_chain.py), then W3 with PDL (the default) and W3 with ENGINE_PDL=0,
# the same modes, one after the other on this machine. Logs and JSON go to $OUT.
#   run: bash scripts/device/w3-pdl.sh [MODES]
set -uo pipefail
source scripts/device/steps.sh
modes="${1:-bf16,int4-torch,int4-triton-mma,int8}"
python -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__, torch.version.cuda)"
step pdl-chain 200 python -m bench.pdl_chain --json "$OUT/pdl-chain.json"
w3="--modes $modes --async-scheduling on --ppl-modes none --repeats 2 --profile"
TAIL=30 step w3-pdl 170 python -m bench.quant $w3 --json "$OUT/w3-pdl.json"
ENGINE_PDL=0 TAIL=30 step w3-no-pdl 170 python -m bench.quant $w3 --json "$OUT/w3-no-pdl.json"
