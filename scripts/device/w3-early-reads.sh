#!/usr/bin/env bash
# One device call for decode attention's reads before its PDL wait (its step inputs, and an L2
# prefetch of its first keys and values), the split combine's loads side by side and gate_up's plain
# product then the SiLU kernel: W3 of every mode (the report run), the engine's greedy tokens against
# Hugging Face (the decode graphs; chunked prefill with preemption), the decode graph's same-process
# A/B (with 'attn-late-reads', the order before, and the int4 products' L2 prefetch of 4 and 16
# groups), then the chained speculative steps (their verify pass reads the same way). About 9 minutes.
# Its first run (2026-12-07 19:15 UTC, bf16 and int4 only, the rest cut by the session's device time):
# BENCHMARKS.md, W3.
#   run: bash scripts/device/w3-early-reads.sh [MODES]
set -uo pipefail
source scripts/device/steps.sh
modes="${1:-bf16,int4-torch,int4-triton-mma,int8,fp8}"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
w3_report 210 "$modes"
TAIL=10 step engine-check 130 python bench/engine_check.py --cases graphs,steps+folds+preempt
TAIL=20 step graph-ab 150 python -m bench.decode_graph_ab --rounds 3 --json "$OUT/graph-ab.json"
TAIL=12 step spec-chain 70 python bench/spec_chain_check.py
