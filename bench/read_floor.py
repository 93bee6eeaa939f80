"""The floor under the int4 matmuls at batch 1: how fast one kernel can only read each layer's codes.

Why. W3's int4 target (2.5x bf16) needs the step's matmuls near 1.3 ms, an average of ~3 TB/s,
while the triton-mma kernel reads the small projections (qkv, o: 8-13 MB) at 1.1-1.3 TB/s. This
times a kernel that does nothing but stream the same bytes (int32 words, [N, K/8], cold in L2,
replayed from a CUDA graph as in bench/int4_mma_sweep.py) over tile sizes and K splits, and an
empty kernel: if reading alone costs most of the matmul's time, no dequantization trick closes
the gap and only fewer, larger kernels (fusing layers) would.

    python -m bench.read_floor [--json out.json]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bench.device import command_line, device_name, graph_seconds_per_call, shapes_cli, write_json
from bench.int4_mma_sweep import COLD_BYTES
from bench.quant import _preset_shapes


@triton.jit
def _read_kernel(w_ptr, out_ptr, N, WORDS, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr):
    """Sums (wrapping) each row's words of this program's K slice; one int32 per row and slice."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    per = WORDS // SPLIT
    cols = tl.arange(0, BLOCK_W)
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
    ptrs = w_ptr + rows[:, None] * WORDS + pid_k * per + cols[None, :]
    for _ in range(0, per, BLOCK_W):
        acc += tl.load(ptrs)
        ptrs += BLOCK_W
    tl.store(out_ptr + pid_k * N + rows, tl.sum(acc, axis=1))


@triton.jit
def _empty_kernel(out_ptr):
    tl.store(out_ptr + tl.program_id(0), 1)


CONFIGS = [(bn, bw, s, w) for bn in (16, 32, 64) for bw in (64, 128) for s in (1, 2, 4, 8) for w in (4,)]


def floor_shape(name: str, k: int, n: int, device: torch.device) -> dict:
    words = k // 8
    nbytes = n * words * 4
    copies = max(2, -(-COLD_BYTES // nbytes))
    ws = [torch.randint(-2**31, 2**31 - 1, (n, words), dtype=torch.int32, device=device) for _ in range(copies)]
    out = torch.empty(8, n, dtype=torch.int32, device=device)
    reps = max(1, -(-20 // copies))
    rows = []
    for bn, bw, split, warps in CONFIGS:
        if n % bn or words % (split * bw):
            continue
        grid = (n // bn, split)

        def call(w, bn=bn, bw=bw, split=split, warps=warps, grid=grid):
            _read_kernel[grid](w, out, n, words, BLOCK_N=bn, BLOCK_W=bw, SPLIT=split, num_warps=warps)

        us = graph_seconds_per_call([lambda w=w: call(w) for w in ws] * reps) * 1e6
        rows.append({"BLOCK_N": bn, "BLOCK_W": bw, "SPLIT": split, "warps": warps, "us": us, "GBps": nbytes / us / 1e3})
    rows.sort(key=lambda r: r["us"])
    return {"shape": name, "K": k, "N": n, "bytes": nbytes, "copies": copies, "best": rows[0], "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    args, device = shapes_cli(__doc__, argv)
    out = torch.empty(1024, dtype=torch.int32, device=device)
    empty_us = graph_seconds_per_call([lambda: _empty_kernel[(132,)](out)] * 50) * 1e6
    results = {"device": device_name(device), "empty_kernel_us": empty_us, "shapes": []}
    print(f"empty kernel (132 programs) in a graph: {empty_us:.2f} us", flush=True)
    for name, (k, n) in _preset_shapes(args.preset).items():
        r = floor_shape(name, k, n, device)
        results["shapes"].append(r)
        top = ", ".join(f"{x['us']:.1f} us ({x['BLOCK_N']},{x['BLOCK_W']},{x['SPLIT']})" for x in r["rows"][:4])
        print(f"{name} K={k} N={n} {r['bytes'] / 1e6:.1f} MB: best {r['best']['us']:.1f} us "
              f"{r['best']['GBps']:.0f} GB/s; top: {top}", flush=True)
    floor = {s["shape"]: s["best"]["us"] for s in results["shapes"]}
    results["step_read_us"] = 32 * sum(floor[s] for s in ("qkv", "o", "gate_up", "down")) + floor["lm_head"]
    print(f"reading every int4 code of one step, one kernel per layer: {results['step_read_us']:.0f} us")
    results["command"] = command_line("bench.read_floor", argv)
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
