#!/usr/bin/env bash
# One device call for the CUDA paths that the CPU cannot run: the chained speculative steps
# at temperature > 0 (greedy / temperature / top-k / top-p graphs per bucket) and the fused
# norm-linear kernel, checked and then timed beside what they replace. Logs go to $OUT.
#   run: PYTHONPATH=$PWD bash scripts/device/check-chain-and-fused.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
step chain-check 150 python bench/spec_chain_check.py
step norm-linear 120 python bench/norm_linear.py --sweep
step w4 330 python bench/speculative.py --variants none,none+fused,none+unfused,draft:2,draft:2+unfused,draft-sync:2 \
  --runs 3 --json "$OUT/w4.json"
