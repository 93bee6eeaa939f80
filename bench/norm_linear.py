"""Checks engine/model/norm_linear.py on a GPU against the kernels it replaces, and times both.

The unfused path of a projection after a norm is add_rmsnorm, the nn.Linear
(cuBLAS) and, for gate_up, silu_and_mul: two or three launches. The fused one is
one Triton kernel. For the bundled demo target's projections, and Qwen3-0.6B's
(its qkv at fused_ops.NORM_LINEAR_MAX_WEIGHT, its gate_up above: where the limit
should lie), at 1, 3, 16 and 48 tokens, bf16:

- the output and the running residual against the unfused path (relative error);
- microseconds per call of each path, as replays of a CUDA graph of 100 calls
  (what a decode or speculative step's graph pays), and the ratio.

    python bench/norm_linear.py            # exits 1 where the outputs disagree
    python bench/norm_linear.py --sweep    # and the fastest tile width / warps per case
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.model import fused_ops, norm_linear  # noqa: E402

# (name, hidden K, outputs N, gated): N is gate_up's 2 I where gated.
SHAPES = [
    ("demo qkv", 384, 640, False),
    ("demo gate_up", 384, 2048, True),
    ("qwen3-0.6b qkv", 1024, 4096, False),
    ("qwen3-0.6b gate_up", 1024, 2 * 3072, True),
]
TOKENS = (1, 3, 16, 48)
CALLS = 100


def unfused(x, residual, norm_w, weight, gated):
    h, summed = fused_ops.add_rmsnorm(x, residual, norm_w, 1e-6)
    out = F.linear(h, weight)
    return (fused_ops.silu_and_mul(out) if gated else out), summed


def fused(x, residual, norm_w, weight, gated, block_n=norm_linear.BLOCK_N, num_warps=None):
    return norm_linear.norm_linear(x, residual, norm_w, 1e-6, weight, None, gated, block_n, num_warps)


def best_tiles(args) -> str:
    """The fastest (block_n, num_warps) of the fused kernel for one case, with its time."""
    timed = {}
    for bn, warps in itertools.product((16, 32, 64), (2, 4, 8)):
        try:
            timed[(bn, warps)] = per_call_us(lambda *a: fused(*a, block_n=bn, num_warps=warps), args)
        except Exception as exc:  # e.g. wide tiles of wide rows: more shared memory than an SM has
            print(f"  (block_n {bn}, {warps} warps: {type(exc).__name__})", end="")
    (bn, warps), us = min(timed.items(), key=lambda item: item[1])
    return f"  best: block_n {bn}, {warps} warps, {us:.2f} us"


def per_call_us(fn, args) -> float:
    """Microseconds per call, from replays of one CUDA graph of CALLS calls."""
    fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return sorted(times)[len(times) // 2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also time other tile widths and warp counts")
    sweep = p.parse_args(argv).sweep
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name(dev)}, bf16, {CALLS} calls per graph")
    print(f"{'projection':<20}{'tokens':>7}{'unfused us':>12}{'fused us':>10}{'ratio':>7}{'rel err':>10}{'residual':>10}")
    bad = 0
    for name, k, n, gated in SHAPES:
        weight = (torch.randn(n, k, device=dev, generator=gen) / k**0.5).to(torch.bfloat16)
        norm_w = (torch.rand(k, device=dev, generator=gen) + 0.5).to(torch.bfloat16)
        for t in TOKENS:
            x = torch.randn(t, k, device=dev, generator=gen).to(torch.bfloat16)
            residual = (4 * torch.randn(t, k, device=dev, generator=gen)).to(torch.bfloat16)
            args = (x, residual, norm_w, weight, gated)
            want, want_sum = unfused(*args)
            got, got_sum = fused(*args)
            err, err_sum = rel_err(got, want), rel_err(got_sum, want_sum)
            ok = err < 1e-2 and err_sum == 0.0
            bad += not ok
            slow, fast = per_call_us(unfused, args), per_call_us(fused, args)
            print(
                f"{name:<20}{t:>7}{slow:>12.2f}{fast:>10.2f}{slow / fast:>7.2f}{err:>10.1e}{err_sum:>10.1e}"
                + ("" if ok else "  MISMATCH")
                + (best_tiles(args) if sweep else ""),
                flush=True,
            )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
