"""Checks the fused rope_and_cache kernel on a GPU against the kernels it replaces, and times both.

The old path is triton_ops.qk_norm_rope (two launches) + write_kv (two
index_copy_); the new one is triton_ops.rope_and_cache (one launch,
`_rope_and_cache_kernel`). Checks, for Llama/Qwen-shaped heads, T = 1, 3, 300
and model/cache dtype pairs:

- the rotated q and both whole caches match the old path's (bit for bit, or within a rounding)
- padding rows on slot 0 (as DecodeGraphs pads a bucket) change nothing outside the null block
- a CUDA graph of the new path replays with new positions/slots like eager

then times 32 layers' worth of each path at batch 1 (Llama-3-8B heads, bf16)
as CUDA-graph replays, and prints the profiler's kernel table.

    python bench/rope_cache.py            # exits 1 on a mismatch
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.device import back_to_back_ms  # noqa: E402
from engine.attention.backend import write_kv  # noqa: E402
from engine.model import fused_ops, triton_ops  # noqa: E402

NUM_BLOCKS, BLOCK_SIZE, MAX_POS = 64, 16, 8192
SHAPES = [  # (heads, kv_heads, head_dim, qk_norm)
    (32, 8, 128, False),  # Llama-3-8B
    (32, 8, 128, True),  # Qwen3-8B
    (16, 8, 128, True),  # Qwen3-0.6B
    (14, 2, 64, False),  # Qwen2.5-0.5B: head counts not powers of two
    (28, 4, 128, False),
]
DTYPES = [  # (model, cache)
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]


def make_case(shape, t: int, dtype, cache_dtype, seed: int = 0):
    h, kvh, d, norm = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(t, (h + 2 * kvh) * d, device="cuda", generator=gen).to(dtype)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], -1)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.outer(torch.arange(MAX_POS, device="cuda").float(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    weight = lambda: (torch.rand(d, device="cuda", generator=gen) + 0.5).to(dtype) if norm else None  # noqa: E731
    args = dict(
        q=q.view(t, h, d), k=k.view(t, kvh, d), v=v.view(t, kvh, d), cos_table=emb.cos(), sin_table=emb.sin(),
        positions=torch.randint(0, MAX_POS, (t,), device="cuda", generator=gen),
        q_weight=weight(), k_weight=weight(), eps=1e-6,
    )
    caches = tuple(
        torch.randn(NUM_BLOCKS, BLOCK_SIZE, kvh, d, device="cuda", generator=gen).to(cache_dtype) for _ in range(2)
    )
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, device="cuda", generator=gen)[:t]
    return args, caches, slots


def old_path(a, k_cache, v_cache, slots):
    q, k = triton_ops.qk_norm_rope(
        a["q"], a["k"], a["cos_table"], a["sin_table"], a["positions"], a["q_weight"], a["k_weight"], a["eps"]
    )
    write_kv(k, a["v"], k_cache, v_cache, slots)
    return q


def new_path(a, k_cache, v_cache, slots):
    return triton_ops.rope_and_cache(**a, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)


def reference(a):
    """q and k through the same norm and rotary in float64 on the CPU (no roundings to the model dtype)."""
    d64 = lambda x: None if x is None else x.detach().double().cpu()  # noqa: E731
    return fused_ops.qk_norm_rope(
        d64(a["q"]), d64(a["k"]), d64(a["cos_table"]), d64(a["sin_table"]), a["positions"].cpu(),
        d64(a["q_weight"]), d64(a["k_weight"]), a["eps"],
    )


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double().cpu() - ref).abs().max().item()


def cached(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return cache.flatten(0, 1)[slots]


def check_against_old_path() -> bool:
    """Both paths against a float64 reference: the fused one may round another way (a per-head sum
    reduced in another order, another FMA contraction), never worse than twice the old path's error;
    v is a plain copy and must match bit for bit."""
    ok, identical = True, 0
    cases = [(shape, t, dt) for shape in SHAPES for t in (1, 3, 300) for dt in DTYPES]
    for shape, t, (dtype, cache_dtype) in cases:
        a, (kc, vc), slots = make_case(shape, t, dtype, cache_dtype)
        kc2, vc2 = kc.clone(), vc.clone()
        q_old, q_new = old_path(a, kc, vc, slots), new_path(a, kc2, vc2, slots)
        same = torch.equal(q_old, q_new) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
        identical += same
        if same:
            continue
        q_ref, k_ref = reference(a)
        errs = {
            "q": (max_err(q_old, q_ref), max_err(q_new, q_ref)),
            "k": (max_err(cached(kc, slots), k_ref), max_err(cached(kc2, slots), k_ref)),
        }
        worse = [n for n, (e_old, e_new) in errs.items() if e_new > 2 * e_old + 1e-6]
        v_same = torch.equal(vc, vc2)
        print(f"differs: {shape} T={t} {dtype}->{cache_dtype}: max error vs float64 (old / new) "
              + ", ".join(f"{n} {e[0]:.3g} / {e[1]:.3g}" for n, e in errs.items()) + f", v identical {v_same}")
        if worse or not v_same:
            ok = False
            print(f"  ^ MISMATCH: new path worse on {worse or ['v']}")
    print(f"vs qk_norm_rope + write_kv: {identical}/{len(cases)} cases bit-identical, all within rounding: {ok}")
    return ok


def check_padding() -> bool:
    """Rows 5..7 pad onto slot 0: every cache row but slot 0 and the five real slots stays as it was."""
    a, (kc, vc), slots = make_case(SHAPES[0], 8, torch.bfloat16, torch.bfloat16, seed=1)
    slots[5:] = 0
    before_k, before_v = kc.clone(), vc.clone()
    q_ref, k_ref = reference(a)
    new_path(a, kc, vc, slots)
    untouched = torch.ones(kc.shape[0] * kc.shape[1], dtype=torch.bool, device="cuda")
    untouched[slots] = False
    ok = bool(torch.equal(kc.flatten(0, 1)[untouched], before_k.flatten(0, 1)[untouched])
              and torch.equal(vc.flatten(0, 1)[untouched], before_v.flatten(0, 1)[untouched]))
    real = slots[:5]
    ok &= torch.equal(cached(vc, real), a["v"][:5]) and max_err(cached(kc, real), k_ref[:5]) < 0.05
    print("padding rows touch only slot 0:", ok)
    return ok


def check_graph() -> bool:
    a, (kc, vc), slots = make_case(SHAPES[1], 4, torch.bfloat16, torch.bfloat16, seed=2)
    kc_eager, vc_eager = kc.clone(), vc.clone()
    new_path(a, kc, vc, slots)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_graph = new_path(a, kc, vc, slots)
    a["positions"].copy_(torch.tensor([5, 7000, 1, 42], device="cuda"))
    slots.copy_(torch.tensor([3, 900, 17, 511], device="cuda"))
    graph.replay()
    q_eager = new_path(a, kc_eager, vc_eager, slots)
    torch.cuda.synchronize()
    flat = lambda c: c.flatten(0, 1)[slots]  # noqa: E731
    ok = torch.equal(q_graph, q_eager) and torch.equal(flat(kc), flat(kc_eager)) and torch.equal(flat(vc), flat(vc_eager))
    print("CUDA graph replay == eager:", ok)
    return ok


def time_paths(layers: int = 32, iters: int = 200) -> None:
    for norm in (False, True):
        shape = (32, 8, 128, norm)
        a, (kc, vc), slots = make_case(shape, 1, torch.bfloat16, torch.bfloat16, seed=3)
        for name, fn in (("old", old_path), ("new", new_path)):
            fn(a, kc, vc, slots)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(layers):
                    fn(a, kc, vc, slots)
            for _ in range(10):
                graph.replay()
            us = back_to_back_ms(graph, iters) * 1000
            print(f"batch 1, qk_norm={norm}, {name}: {us:.1f} us per {layers} layers")


def profile_kernels() -> None:
    from torch.profiler import ProfilerActivity, profile

    a, (kc, vc), slots = make_case((32, 8, 128, True), 1, torch.bfloat16, torch.bfloat16, seed=4)
    old_path(a, kc, vc, slots)
    new_path(a, kc, vc, slots)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(32):
            old_path(a, kc, vc, slots)
            new_path(a, kc, vc, slots)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


def main() -> int:
    ok = check_against_old_path() & check_padding() & check_graph()
    time_paths()
    profile_kernels()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
