#!/usr/bin/env bash
# One shorter device call for two questions at once: the decode graph's same-process A/B of decode
# attention's preload variants (as in w3-preload.sh, without the W3 runs), then the W2 report run
# whose output times each stream's way out (as in w2-way-out.sh). Needs .raybundle carried.
# About 7 minutes at ROUNDS=1.
#   run: AB_ROUNDS=2 LEVELS=16,64,256 ROUNDS=1 bash scripts/device/ab-and-way-out.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
preload_ab 200
with_ray || exit 1
w2_report 330 48
