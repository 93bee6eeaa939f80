"""Where a decode step's time goes: wall clock per step against GPU busy time per step.

The gap between the two is host time the GPU waits through (Python
scheduling, input preparation, the sync that reads sampled tokens back).
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.device import back_to_back_ms
from engine import SamplingParams
from engine.engine import LLMEngine


def profile_decode(
    engine: LLMEngine, prompts: list[list[int]], steps: int = 16, top: int = 12, tokens_per_step: int = 1, host_top: int = 0
) -> dict:
    """tokens_per_step: the most tokens one step may add to a sequence (1 + k with speculation);
    host_top > 0: also the host functions that take the most time per step (cProfile, cumulative)."""
    room = engine.max_model_len - max(len(p) for p in prompts)
    runs = 3 if host_top else 2
    steps = max(1, min(steps, (room - 2) // (runs * tokens_per_step)))  # every request must outlive all measured runs
    params = SamplingParams(max_tokens=runs * tokens_per_step * steps + 1, temperature=0.0, ignore_eos=True)
    ids = [f"profile-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    # Prefill everything first, so the measured steps are pure decode at full batch.
    while any(seq.num_output_tokens == 0 for seq in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    kv = kv_memory(engine)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    graph_ms = decode_graph_ms(engine, len(prompts))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    kernels = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    host = host_profile(engine, steps, host_top) if host_top else []
    for rid in ids:
        engine.abort_request(rid)
    return {
        **kv,
        "batch": len(prompts),
        "wall_ms_per_step": wall_ms,
        "gpu_busy_ms_per_step": device_us / steps / 1e3,
        "graph_replay_ms_per_step": graph_ms,
        "top_kernels": [
            {"name": e.key[:80], "ms_per_step": e.self_device_time_total / steps / 1e3, "calls_per_step": e.count / steps}
            for e in kernels
        ],
        "host_top": host,
    }


def decode_graph_ms(engine: LLMEngine, batch: int, replays: int = 20) -> float | None:
    """The decode step's CUDA graph for `batch` replayed back to back: the forward pass's GPU time
    alone, against which wall_ms_per_step shows what the host and sampling add. Kernel durations
    from the profiler overlap under programmatic dependent launch (engine/pdl.py) and do not add up
    to the step; this does. None without graphs. The replays rewrite the last step's KV slot with
    the same values."""
    graphs = engine.runner.graphs
    if graphs is None or not graphs.fits(batch):
        return None
    graph = graphs.graphs[graphs.bucket_for(batch)]
    graph.replay()
    torch.cuda.synchronize()
    return back_to_back_ms(graph, replays)


def host_profile(engine: LLMEngine, steps: int, top: int) -> list[dict]:
    """The functions under engine.step with the most cumulative time per step. A host-to-device
    read (tolist, item) counts the wait for the GPU too, so it shows where the host stalls."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, _, own s, cumulative s, _)
    rows = sorted(stats.items(), key=lambda kv: kv[1][3], reverse=True)
    out = []
    for (file, line, name), (calls, _, own, cum, _) in rows:
        if name in ("step", "<built-in method builtins.exec>") or "profiler" in file:
            continue
        where = file.rsplit("/", 2)
        out.append({
            "name": f"{'/'.join(where[-2:])}:{line}:{name}" if line else name,
            "cum_ms_per_step": cum / steps * 1e3,
            "own_ms_per_step": own / steps * 1e3,
            "calls_per_step": calls / steps,
        })
        if len(out) == top:
            break
    return out


def kv_memory(engine: LLMEngine) -> dict:
    """KV cache in use at this moment, and the share of it lost to partly filled last blocks."""
    bs = engine.allocator.block_size
    seqs = engine.scheduler.running
    slots = sum(len(s.blocks) * bs for s in seqs)
    used = sum(s.num_tokens for s in seqs)
    block_bytes = engine.kv_cache[:, :, 0].numel() * engine.kv_cache.element_size()
    return {
        "kv_pool_gib": engine.kv_cache.numel() * engine.kv_cache.element_size() / 2**30,
        "kv_in_use_gib": slots // bs * block_bytes / 2**30,
        "kv_waste_fraction": (slots - used) / slots if slots else 0.0,
    }


def print_profile(p: dict) -> None:
    print(
        f"\nKV cache: pool {p['kv_pool_gib']:.1f} GiB, in use {p['kv_in_use_gib']:.2f} GiB at batch {p['batch']}, "
        f"{p['kv_waste_fraction']:.1%} of allocated slots unfilled (fragmentation)"
    )
    gap = p["wall_ms_per_step"] - p["gpu_busy_ms_per_step"]
    graph = p.get("graph_replay_ms_per_step")
    replay = "" if graph is None else f"; its decode graph replayed alone: {graph:.3f} ms"
    print(
        f"decode step at batch {p['batch']}: {p['wall_ms_per_step']:.2f} ms wall, "
        f"{p['gpu_busy_ms_per_step']:.2f} ms GPU busy, {gap:.2f} ms host-bound gap{replay}"
    )
    for k in p["top_kernels"]:
        print(f"  {k['ms_per_step']:7.3f} ms  x{k['calls_per_step']:<6.0f} {k['name']}")
    if p.get("host_top"):
        print("host, per step (cProfile, which slows Python: compare rows, not with the wall time): cumulative / own ms")
        for h in p["host_top"]:
            print(f"  {h['cum_ms_per_step']:7.3f} / {h['own_ms_per_step']:6.3f} ms  x{h['calls_per_step']:<5.1f} {h['name']}")
