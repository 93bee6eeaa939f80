#!/usr/bin/env bash
# One device call for both open measurements, most wanted first (a call is cut at 600 s; what is
# under $OUT by then comes back): our greedy tokens against HF's with num_scheduler_steps and the
# decode folds (bench/engine_check.py), W2 with num_scheduler_steps=8 for both paths, W3's bf16 and
# int4 triton-mma rows with decode_folds on, then the int4 row without them. Needs .raybundle carried.
# Both int4 rows run the self-check first: without it the autotuner picked other configs in its first
# run (3.09 against 2.67 ms a step), which is no A/B of the folds. The engine check needs ~110 s.
#   run: bash scripts/device/steps-and-folds.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=8 step check 120 python bench/engine_check.py --cases graphs+steps,steps+folds+preempt
STEPS_LIST=8 LEVELS=16,64,256 ROUNDS=2 bash scripts/device/w2-steps.sh
w3="--async-scheduling on --ppl-modes none --repeats 2 --profile --skip-kernel-check"
TAIL=8 step w3-folds 170 python -m bench.quant --modes bf16,int4-triton-mma --decode-folds $w3 --json "$OUT/w3-folds.json"
grep -h "decode step at batch\|^speed\|tok/s" "$OUT"/w3-folds.log | tail -n 8
TAIL=8 step w3-unfolded 100 python -m bench.quant --modes int4-triton-mma --no-decode-folds $w3 --json "$OUT/w3-unfolded.json"
