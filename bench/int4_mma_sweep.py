"""Tile sweep of the triton-mma int4 kernel at batch 1, on the 8B model's projection shapes.

Why. The autotuner picks among a short list at engine start (each entry is a compile), and it
times every candidate on one weight that stays in L2 between calls. In the model every layer's
weight comes from HBM once per step. This times many more configs the model's way: each call
reads another copy of the weight (copies together well over the L2), replayed from a CUDA
graph (no launch overhead), so the winners can go into the tuned list. Every config is also
checked against the dequantized reference before it is timed.

Also timed here, for the same step: the decode attention at batch 1 with 1-8 context splits,
and greedy argmax over the vocabulary (one reduction against a two-stage one).

    python -m bench.int4_mma_sweep [--json out.json] [--top 6]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench.device import command_line, device_name, graph_seconds_per_call, write_json
from bench.quant import _preset_shapes

COLD_BYTES = 256 << 20  # copies of a weight per timed pass: past the H100/H200 L2 (50 MB)
GROUP = 128


# (BLOCK_N, STEP_GROUPS, SPLIT_K, warps, stages)
def sweep_configs() -> list[tuple[int, int, int, int, int]]:
    configs = []
    for stages in (1, 2, 3, 4):
        configs += [(64, 4, s, 4, stages) for s in (1, 2, 4, 8)]
        configs += [(64, 8, s, 4, stages) for s in (1, 2, 4)]
        configs += [(128, 8, s, 8, stages) for s in (1, 4)]
    configs += [(64, 16, s, 4, 1) for s in (1, 2)] + [(128, 4, s, 8, 1) for s in (1, 4)]
    configs += [(128, 8, 1, 4, 1), (256, 8, 1, 8, 1)] + [(32, 8, s, 2, 1) for s in (1, 4)]
    return configs


def cfg_dict(c: tuple) -> dict:
    n, sg, sk, w, st = c
    return {"BLOCK_N": n, "STEP_GROUPS": sg, "SPLIT_K": sk, "num_warps": w, "num_stages": st}


def graph_us(calls) -> float:
    return graph_seconds_per_call(calls) * 1e6


def sweep_shape(name: str, k: int, n: int, configs: list[tuple], device: torch.device) -> dict:
    from torch import nn

    from engine.quant import int4_mma
    from engine.quant.int4 import Int4Linear

    gen = torch.Generator(device=device).manual_seed(0)
    lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    lin.weight.normal_(0, 0.02, generator=gen)
    layer = Int4Linear.from_float(lin, GROUP)
    del lin
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16, generator=gen)
    ref = (x.double() @ layer.dequantize(torch.float32).double().t()).float()
    layer.to_mma_()
    nbytes = sum(t.numel() * t.element_size() for t in (layer.mma_qweight, layer.scales, layer.zeros))
    copies = max(2, math.ceil(COLD_BYTES / nbytes))
    weights = [(layer.mma_qweight.clone(), layer.scales.clone(), layer.zeros.clone()) for _ in range(copies)]
    reps = max(1, math.ceil(20 / copies))
    ws = int4_mma.MmaWorkspace.for_rows(n, device)
    bound = 2.0**-8 * ref.abs() + 1e-4 * ref.abs().max()
    rows = []
    for c in configs:
        cfg = cfg_dict(c)
        if not int4_mma._fits(cfg["STEP_GROUPS"], cfg["SPLIT_K"], GROUP, k // GROUP) or n % cfg["BLOCK_N"]:
            continue
        row = {"config": cfg}
        try:
            def call(w, cfg=cfg):
                return int4_mma.int4_mma_matmul(x, w[0], w[1], w[2], None, GROUP, ws, cfg)

            y = call(weights[0]).float()
            row["excess"] = float((((y - ref).abs() - bound) / bound).max())
            us = graph_us([lambda w=w: call(w) for w in weights] * reps)
            row.update(us=us, GBps=nbytes / us / 1e3)
        except Exception as exc:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
    # What the engine's autotuner picks (on its own, L2-warm timing), timed the same way.
    auto = {}
    int4_mma.int4_mma_matmul(x, weights[0][0], weights[0][1], weights[0][2], None, GROUP, ws)
    best = next((c for key, c in int4_mma._int4_mma_tuned.cache.items() if tuple(key[:3]) == (n, k, GROUP)), None)
    if best is not None:
        auto["config"] = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
    auto["us"] = graph_us([lambda w=w: int4_mma.int4_mma_matmul(x, w[0], w[1], w[2], None, GROUP, ws)
                           for w in weights] * reps)
    auto["GBps"] = nbytes / auto["us"] / 1e3
    bf16 = bf16_us(k, n, device)
    ok = [r for r in rows if "us" in r and r["excess"] <= 0]
    ok.sort(key=lambda r: r["us"])
    return {"shape": name, "K": k, "N": n, "bytes": nbytes, "copies": copies, "rows": rows, "best": ok[:1],
            "autotuned": auto, "bf16_us": bf16, "bad": [r for r in rows if r.get("excess", 0) > 0 or "error" in r]}


def bf16_us(k: int, n: int, device: torch.device) -> float:
    import torch.nn.functional as F

    w0 = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    copies = max(2, math.ceil(COLD_BYTES / w0.nbytes))
    ws = [w0] + [w0.clone() for _ in range(copies - 1)]
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    return graph_us([lambda w=w: F.linear(x, w) for w in ws] * max(1, math.ceil(20 / copies)))


def attention_splits(device: torch.device) -> list[dict]:
    """Decode attention at batch 1 (8B shape: 32 heads, 8 KV heads, dim 128), 256 tokens of context."""
    from engine.attention.triton_paged import paged_decode_attention

    block, ctx, layers = 16, 256, 32
    blocks = ctx // block + 1
    kc = torch.randn(layers, blocks + 4, block, 8, 128, device=device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(1, 32, 128, device=device, dtype=torch.bfloat16)
    table = torch.arange(blocks, device=device, dtype=torch.int32)[None]
    lens = torch.tensor([ctx], device=device, dtype=torch.int32)
    out = []
    ref = paged_decode_attention(q, kc[0], vc[0], table, lens, 0.088, num_splits=1).float()
    for splits in (1, 2, 4, 8, 16):
        y = paged_decode_attention(q, kc[0], vc[0], table, lens, 0.088, num_splits=splits).float()
        us = graph_us([lambda i=i, s=splits: paged_decode_attention(q, kc[i], vc[i], table, lens, 0.088, num_splits=s)
                       for i in range(layers)])
        out.append({"splits": splits, "us": us, "max_abs_diff": float((y - ref).abs().max())})
    return out


def argmax_variants(device: torch.device, vocab: int = 128256) -> list[dict]:
    logits = torch.randn(1, vocab, device=device, dtype=torch.float32)

    def two_stage(lg, chunk=1024):
        rows, v = lg.shape
        pad = (-v) % chunk
        padded = torch.nn.functional.pad(lg, (0, pad), value=float("-inf")) if pad else lg
        vals, idx = padded.view(rows, -1, chunk).max(dim=-1)
        best = vals.argmax(dim=-1, keepdim=True)
        return (best * chunk + idx.gather(1, best)).squeeze(1)

    assert torch.equal(two_stage(logits), logits.argmax(dim=-1))
    return [
        {"variant": "argmax", "us": graph_us([lambda: logits.argmax(dim=-1)] * 20)},
        {"variant": "two-stage 1024", "us": graph_us([lambda: two_stage(logits)] * 20)},
        {"variant": "two-stage 4096", "us": graph_us([lambda: two_stage(logits, 4096)] * 20)},
    ]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--json", default=None)
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    t0 = time.perf_counter()
    configs = sweep_configs()
    results = {"device": device_name(device), "configs": len(configs), "shapes": []}
    for name, (k, n) in _preset_shapes(args.preset).items():
        r = sweep_shape(name, k, n, configs, device)
        results["shapes"].append(r)
        print(f"{name} K={k} N={n} {r['bytes'] / 1e6:.1f} MB x{r['copies']}: bf16 {r['bf16_us']:.1f} us; "
              f"autotuned {r['autotuned']['us']:.1f} us ({r['autotuned']['GBps']:.0f} GB/s) {r['autotuned'].get('config')}",
              flush=True)
        ok = sorted((x for x in r["rows"] if "us" in x and x["excess"] <= 0), key=lambda x: x["us"])
        for x in ok[: args.top]:
            print(f"    {x['us']:7.1f} us {x['GBps']:6.0f} GB/s  {x['config']}", flush=True)
        for x in r["bad"]:
            print(f"    BAD {x}", flush=True)
    per_layer = {s["shape"]: (s["best"][0]["us"] if s["best"] else None) for s in results["shapes"]}
    auto_layer = {s["shape"]: s["autotuned"]["us"] for s in results["shapes"]}
    layers = 32
    def step(d):
        return layers * sum(d[s] for s in ("qkv", "o", "gate_up", "down")) + d["lm_head"]
    if None not in per_layer.values():
        results["step_matmul_us"] = {"best": step(per_layer), "autotuned": step(auto_layer)}
        print(f"matmuls per step: best configs {step(per_layer):.0f} us, autotuned {step(auto_layer):.0f} us")
    results["attention"] = attention_splits(device)
    for a in results["attention"]:
        print(f"attention batch 1, 256 tokens, splits {a['splits']}: {a['us']:.2f} us (diff {a['max_abs_diff']:.1e})")
    results["argmax"] = argmax_variants(device)
    for a in results["argmax"]:
        print(f"argmax {a['variant']}: {a['us']:.2f} us")
    results["seconds"] = time.perf_counter() - t0
    results["command"] = command_line("bench.int4_mma_sweep", argv)
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
