#!/usr/bin/env bash
# The shortest call for decode attention's preload (see w3-preload.sh): the decode graph's
# same-process A/B of the four variants first, then W3 of bf16 and int4 (the report's command)
# under whichever variant the A/B found fastest, or as shipped if none beat it. About 4 minutes.
#   run: bash scripts/device/w3-preload-short.sh
set -uo pipefail
source scripts/device/steps.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=24 step graph-ab 130 python -m bench.decode_graph_ab --rounds "${AB_ROUNDS:-2}" \
  --variants attn-preload,attn-1x256,attn-wide,mma-no-split --json "$OUT/graph-ab.json"
best=$(python - "$OUT/graph-ab.json" <<'PY'
import json, sys
ms = json.load(open(sys.argv[1]))["ms_per_replay"]
tried = {v: t for v, t in ms.items() if v != "shipped"}
best = min(tried, key=tried.get) if tried else None
print(best if best and tried[best] < ms["shipped"] else "shipped")
PY
)
echo "=== W3 under: $best"
run=(python -m bench.with_variant "$best" bench.quant)
[ "$best" = shipped ] && run=(python -m bench.quant)
TAIL=24 step w3 130 "${run[@]}" --modes bf16,int4-triton-mma \
  --async-scheduling on --ppl-modes none --repeats 2 --profile --json "$OUT/w3.json"
