"""Where a decode step's time goes: wall clock per step against GPU busy time per step.

The gap between the two is host time the GPU waits through (Python
scheduling, input preparation, the sync that reads sampled tokens back).
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from engine import SamplingParams
from engine.engine import LLMEngine


def profile_decode(engine: LLMEngine, prompts: list[list[int]], steps: int = 16, top: int = 12) -> dict:
    room = engine.max_model_len - max(len(p) for p in prompts)
    steps = max(1, min(steps, (room - 2) // 2))  # every request must outlive both measured runs
    params = SamplingParams(max_tokens=2 * steps + 1, temperature=0.0, ignore_eos=True)
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
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    kernels = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    for rid in ids:
        engine.abort_request(rid)
    return {
        **kv,
        "batch": len(prompts),
        "wall_ms_per_step": wall_ms,
        "gpu_busy_ms_per_step": device_us / steps / 1e3,
        "top_kernels": [
            {"name": e.key[:80], "ms_per_step": e.self_device_time_total / steps / 1e3, "calls_per_step": e.count / steps}
            for e in kernels
        ],
    }


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
    print(
        f"decode step at batch {p['batch']}: {p['wall_ms_per_step']:.2f} ms wall, "
        f"{p['gpu_busy_ms_per_step']:.2f} ms GPU busy, {gap:.2f} ms host-bound gap"
    )
    for k in p["top_kernels"]:
        print(f"  {k['ms_per_step']:7.3f} ms  x{k['calls_per_step']:<6.0f} {k['name']}")
