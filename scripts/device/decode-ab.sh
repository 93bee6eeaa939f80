#!/usr/bin/env bash
# One device call: where the int4 decode graph's time went between 1d5b147 and now. The decode graph's
# variants A/B (bench/decode_graph_ab.py), then W3's int4 row of the code at 1d5b147 (carried in .old:
# `git archive 1d5b147 engine bench | tar -x -C .old`) and of this checkout, on the same machine.
#   run: bash scripts/device/decode-ab.sh   (carry .old)
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=12 step ab 120 python -m bench.decode_graph_ab --rounds 5 --json "$OUT/ab.json"
w3="--modes int4-triton-mma --async-scheduling on --ppl-modes none --repeats 3 --profile --skip-self-check --skip-kernel-check"
(cd .old && export PYTHONPATH=$PWD && TAIL=6 step w3-old 100 python -m bench.quant $w3 --json "$OUT/w3-old.json")
TAIL=6 step w3-new 100 python -m bench.quant $w3 --json "$OUT/w3-new.json"
grep -h "decode step at batch\|^speed" "$OUT"/w3-*.log
