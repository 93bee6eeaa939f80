#!/usr/bin/env bash
# One device call for the decode step's fusions (SiLU in the gate_up int4 kernel's epilogue, the
# attention splits combined by their last program, greedy argmax in one kernel, the graph's inputs
# staged in one copy): W3 with the int4 self-check (gated configs bit
# for bit) and the kernel check (gate_up then SiLU against the gated kernel), then the engine's
# greedy tokens against Hugging Face (CUDA graphs on and off), then W1 without its peers. Logs and JSON
# go to $OUT.
#   run: bash scripts/device/w3-fused.sh [MODES]
set -uo pipefail
source scripts/device/steps.sh
modes="${1:-bf16,int4-torch,int4-triton-mma,int8,fp8}"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
# The host's CPUs (for W2's CPU plan): SMT siblings, sockets, model.
lscpu | grep -i "model name\|thread(s) per core\|core(s) per socket\|socket(s)\|^CPU(s)\|MHz"
for c in 0 7 8 15; do echo "cpu$c siblings $(cat /sys/devices/system/cpu/cpu$c/topology/thread_siblings_list 2>/dev/null)"; done
w3_report 200 "$modes"
grep -h "self-check\|kernel gate_up\|first tokens\|^speed" "$OUT/w3.log"
TAIL=16 step engine-check 130 python bench/engine_check.py
# W1 (the decode graphs' staged inputs at up to 256 sequences), ours alone.
TAIL=12 step w1 110 python -m bench.throughput --peers none --variants graphs-async --json "$OUT/w1.json"
