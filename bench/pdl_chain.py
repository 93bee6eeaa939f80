"""The int4 products at batch 1 behind the kernel before them, launched with PDL and without.

Why. In the model each int4 product follows a small kernel of ours (the norm, attention's combine,
SiLU), and at batch 1 the small projections are latency bound (bench/read_floor.py). Launched with
programmatic dependent launch (engine/pdl.py) a product's programs are placed while the kernel
ahead still runs, ask the L2 for their first weights, and wait for it only before reading x. This
times pairs (add_rmsnorm, then the int4 product on its output) per 8B layer shape, each pair on
another input and another copy of the weight (cold in L2), replayed from a CUDA graph, in four
variants: no PDL; PDL without the prefetch; PDL with PREFETCH_GROUPS 8 and 16. Every variant's
outputs must equal the eager, PDL-free ones bit for bit: a missing wait would read the previous
pair's x.

    python -m bench.pdl_chain [--json out.json]
"""

from __future__ import annotations

import math
import os

import torch

from bench.device import command_line, device_name, graph_replay, graph_seconds_per_call, shapes_cli
from bench.device import write_json
from bench.int4_mma_sweep import COLD_BYTES, GROUP
from bench.quant import _preset_shapes

# Each 8B layer's tuned tile (engine/quant/int4_mma.py's list): (BLOCK_N, STEP_GROUPS, SPLIT_K, warps, stages)
TILES = {"qkv": (64, 4, 4, 4, 2), "o": (64, 4, 4, 4, 3), "gate_up": (64, 4, 1, 4, 2), "down": (64, 4, 4, 4, 3),
         "lm_head": (64, 4, 1, 4, 2)}
VARIANTS = [("no PDL", False, 0), ("PDL", True, 0), ("PDL, prefetch 8 groups", True, 8),
            ("PDL, prefetch 16 groups", True, 16)]


def chain_shape(name: str, k: int, n: int, device: torch.device) -> dict:
    from torch import nn

    from engine.model.triton_ops import add_rmsnorm
    from engine.quant import int4_mma
    from engine.quant.int4 import Int4Linear

    gen = torch.Generator(device=device).manual_seed(0)
    lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    lin.weight.normal_(0, 0.02, generator=gen)
    layer = Int4Linear.from_float(lin, GROUP)
    del lin
    layer.to_mma_()
    nbytes = sum(t.numel() * t.element_size() for t in (layer.mma_qweight, layer.scales, layer.zeros))
    copies = max(2, math.ceil(COLD_BYTES / nbytes))
    weights = [(layer.mma_qweight.clone(), layer.scales.clone(), layer.zeros.clone()) for _ in range(copies)]
    calls_per_pass = copies * max(1, math.ceil(20 / copies))
    xs = [torch.randn(1, k, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(calls_per_pass)]
    norm_w = torch.rand(k, device=device, dtype=torch.bfloat16, generator=gen) + 0.5
    ws = int4_mma.MmaWorkspace.for_rows(n, device)
    bn, sg, sk, warps, stages = TILES[name]
    cfg = {"BLOCK_N": bn, "STEP_GROUPS": sg, "SPLIT_K": sk, "num_warps": warps, "num_stages": stages}

    def pair(i: int, pdl: bool, prefetch: int) -> torch.Tensor:
        h, _ = add_rmsnorm(xs[i], None, norm_w, 1e-5)
        w = weights[i % copies]
        return int4_mma.int4_mma_matmul(h, w[0], w[1], w[2], None, GROUP, ws, cfg, pdl=pdl, prefetch_groups=prefetch)

    os.environ["ENGINE_PDL"] = "0"
    reference = [pair(i, False, 0) for i in range(calls_per_pass)]
    norm_us = graph_seconds_per_call([lambda i=i: add_rmsnorm(xs[i], None, norm_w, 1e-5)[0]
                                      for i in range(calls_per_pass)]) * 1e6
    rows = []
    for label, pdl, prefetch in VARIANTS:
        os.environ["ENGINE_PDL"] = "1" if pdl else "0"  # the norm's launch follows it (engine/pdl.py)
        calls = [lambda i=i, p=pdl, f=prefetch: pair(i, p, f) for i in range(calls_per_pass)]
        for call in calls[:2]:
            call()  # compiles
        seconds, outs = graph_replay(calls)
        same = all(torch.equal(a, b) for a, b in zip(outs, reference))
        rows.append({"variant": label, "pdl": pdl, "prefetch_groups": prefetch, "pair_us": seconds * 1e6,
                     "bit_identical": same})
    os.environ.pop("ENGINE_PDL", None)
    return {"shape": name, "K": k, "N": n, "bytes": nbytes, "copies": copies, "tile": cfg, "norm_alone_us": norm_us,
            "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    args, device = shapes_cli(__doc__, argv)
    results = {"device": device_name(device), "shapes": []}
    for name, (k, n) in _preset_shapes(args.preset).items():
        r = chain_shape(name, k, n, device)
        results["shapes"].append(r)
        print(f"{name} K={k} N={n} {r['bytes'] / 1e6:.1f} MB, norm alone {r['norm_alone_us']:.1f} us:", flush=True)
        for row in r["rows"]:
            print(f"    {row['variant']:<26} norm + product {row['pair_us']:6.1f} us  "
                  f"bit-identical {row['bit_identical']}", flush=True)
    step = {}
    for label, _, _ in VARIANTS:
        per = {s["shape"]: next(r["pair_us"] for r in s["rows"] if r["variant"] == label) for s in results["shapes"]}
        step[label] = 32 * sum(per[s] for s in ("qkv", "o", "gate_up", "down")) + per["lm_head"]
        print(f"step (32 layers of pairs + lm_head), {label}: {step[label]:.0f} us")
    results["step_pairs_us"] = step
    results["command"] = command_line("bench.pdl_chain", argv)
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
