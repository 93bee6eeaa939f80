#!/usr/bin/env bash
# One device call: the W2 report run, whose output now also times each stream's way out (the
# end-timing comment before [DONE]: engine's finish -> last output on the replica -> the ingress's
# last write -> the client), beside the Server-Timing legs of the way in. Needs .raybundle carried.
# About 5-6 minutes at three levels and two rounds.
#   run: LEVELS=16,64,256 ROUNDS=2 bash scripts/device/w2-way-out.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
with_ray || exit 1
w2_report 540 48
