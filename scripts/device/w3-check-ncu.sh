#!/usr/bin/env bash
# One device call after a change to the decode kernels: the engine's greedy tokens against Hugging
# Face's (bench/engine_check.py), the norm + int4 product pairs with and without PDL, W3 (the report
# run), and Nsight Compute's view of the int4 kernel on two 8B shapes. Logs and JSON go to $OUT.
#   run: bash scripts/device/w3-check-ncu.sh
set -uo pipefail
source scripts/device/steps.sh
step engine-check 150 python bench/engine_check.py
step pdl-chain 150 python -m bench.pdl_chain --json "$OUT/pdl-chain.json"
TAIL=8 step w3 170 python -m bench.quant --modes bf16,int4-torch,int4-triton-mma,int8 --async-scheduling on \
  --ppl-modes none --repeats 2 --profile --json "$OUT/w3.json"
cat > /tmp/ncu_driver.py <<'PY'
import torch
from torch import nn
from engine.quant import int4_mma
from engine.quant.int4 import Int4Linear
for k, n, cfg in ((4096, 28672, (64, 4, 1, 4, 2)), (4096, 128256, (64, 4, 1, 4, 2))):
    lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layer = Int4Linear.from_float(lin, 128); layer.to_mma_()
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    c = dict(zip(("BLOCK_N", "STEP_GROUPS", "SPLIT_K", "num_warps", "num_stages"), cfg))
    for _ in range(3):
        int4_mma.int4_mma_matmul(x, layer.mma_qweight, layer.scales, layer.zeros, None, 128, None, c, pdl=False)
    torch.cuda.synchronize()
PY
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
TAIL=400 step ncu 150 "$ncu" --clock-control none --kernel-name regex:_int4_mma --launch-skip 2 --launch-count 2 \
  --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy \
  --section LaunchStats --section SchedulerStats python /tmp/ncu_driver.py
