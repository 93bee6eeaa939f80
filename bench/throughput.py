"""W1 of shared/BENCHMARK.md: offline throughput, ours beside Hugging Face, against the ceiling.

    python -m bench.throughput                      # the headline run (Qwen3-0.6B shape, 256 requests)
    python -m bench.throughput --num-requests 64 --peers none
    python -m bench.throughput --preset tiny-qwen3 --num-requests 4 --output-len 4   # CPU smoke run
    python -m bench.throughput --peers none --variants graphs,graphs-async --profile  # async scheduling beside the synchronous step

Prints a table and the W1 report line; --json writes every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.device import device_name, free_memory, sync

from bench.ceiling import measure_device_rates, offline_floor_seconds, weight_bytes
from bench.step_profile import print_profile, profile_decode
from bench.hf_peers import hf_generate_batch, hf_padded_generate
from bench.workloads import OfflineWorkload, offline_workload
from engine import EngineConfig, SamplingParams, SchedulerConfig
from engine.engine import LLMEngine
from engine.model.presets import preset_config, save_hf_checkpoint


VARIANTS = ("graphs", "eager", "graphs-async", "eager-async")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--variants", default="graphs",
        help="comma list of: graphs, eager, graphs-async, eager-async (-async: EngineConfig.async_scheduling)",
    )
    p.add_argument("--peers", default="generate_batch,padded", help="comma list of: generate_batch, padded; or none")
    p.add_argument("--profile", action="store_true", help="also profile decode steps at full batch")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def run_ours(path: Path, work: OfflineWorkload, args: argparse.Namespace, variant: str) -> dict:
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}: pick from {', '.join(VARIANTS)}")
    config = EngineConfig(
        model=str(path),
        enforce_eager=variant.startswith("eager"),
        async_scheduling=variant.endswith("-async"),
        max_model_len=args.max_len + args.output_len + 16,
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
    )
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    init_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=work.output_len, temperature=0.0, ignore_eos=True)
    engine.generate(work.prompts[:8], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    sync(engine.device)
    start = time.perf_counter()
    outs = engine.generate(work.prompts, params)
    sync(engine.device)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = engine.stats()
    profile = profile_decode(engine, work.prompts[: args.max_num_seqs]) if args.profile else None
    if profile:
        print(f"\nprofile of ours ({variant}):", end="")
        print_profile(profile)
    result = {
        "seconds": seconds,
        "tokens": tokens,
        "tok_s": tokens / seconds,
        "init_s": init_s,
        "num_kv_blocks": engine.allocator.pool.num_usable_blocks,
        "preemptions": stats.num_preemptions,
        "first_tokens": [o.outputs[0].token_ids[0] for o in outs],
        "profile": profile,
    }
    del engine, outs
    free_memory()
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    arch_cfg = preset_config(args.preset)
    work = offline_workload(args.num_requests, args.min_len, args.max_len, args.output_len, arch_cfg["vocab_size"])
    results: dict = {"device": device_name(device), "preset": args.preset, "num_requests": args.num_requests}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_hf_checkpoint(args.preset, Path(tmp) / "model", seed=0, dtype=str(dtype).removeprefix("torch."))
        rates = measure_device_rates(device)
        for variant in args.variants.split(","):
            results[f"ours_{variant}"] = run_ours(path, work, args, variant)
            print(f"ours ({variant}): {results[f'ours_{variant}']['tok_s']:.0f} tok/s", flush=True)
        peers = [] if args.peers == "none" else args.peers.split(",")
        if "generate_batch" in peers:
            s, n = hf_generate_batch(path, work, device, dtype)
            results["hf_generate_batch"] = {"seconds": s, "tokens": n, "tok_s": n / s}
            print(f"HF generate_batch: {n / s:.0f} tok/s", flush=True)
            free_memory()
        if "padded" in peers:
            s, n = hf_padded_generate(path, work, device, dtype)
            results["hf_padded_generate"] = {"seconds": s, "tokens": n, "tok_s": n / s}
            print(f"HF padded generate (batch 64): {n / s:.0f} tok/s", flush=True)
            free_memory()
        results["ceiling"] = _ceiling(path, work, rates)
    report(results, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _ceiling(path: Path, work: OfflineWorkload, rates) -> dict:
    from engine.model.loader import load_model

    loaded = load_model(str(path), device="cpu", dtype="bfloat16")
    n_bytes, n_params = weight_bytes(loaded.model), sum(p.numel() for p in loaded.model.parameters())
    floor = offline_floor_seconds(loaded.arch, n_bytes, n_params, work.prompt_lens, work.output_len, rates)
    return {
        "bandwidth_TBps": rates.bandwidth_bytes_per_s / 1e12,
        "matmul_TFLOPs": rates.matmul_flops_per_s / 1e12,
        "floor_seconds": floor,
        "tok_s": work.total_output_tokens / floor,
        "weight_bytes": n_bytes,
    }


def report(results: dict, args: argparse.Namespace) -> None:
    ceiling = results["ceiling"]["tok_s"]
    rows = [(k, v) for k, v in results.items() if isinstance(v, dict) and "tok_s" in v and k != "ceiling"]
    print(f"\nW1 offline throughput on {results['device']} ({args.preset}, {args.num_requests} requests)")
    print(f"{'system':<24}{'tok/s':>10}{'seconds':>10}{'of ceiling':>12}")
    for name, r in rows:
        print(f"{name:<24}{r['tok_s']:>10.0f}{r['seconds']:>10.2f}{r['tok_s'] / ceiling:>12.3f}")
    print(f"{'ceiling':<24}{ceiling:>10.0f}{results['ceiling']['floor_seconds']:>10.2f}{1.0:>12.3f}")
    best = max((r for n, r in rows if n.startswith("ours")), key=lambda r: r["tok_s"])
    hf = results.get("hf_generate_batch")
    ratio = f", {best['tok_s'] / hf['tok_s']:.1f}x" if hf else ""
    hf_part = f", {hf['tok_s']:.0f} tok/s HF generate_batch" if hf else ""
    padded = results.get("hf_padded_generate")
    padded_part = f", {padded['tok_s']:.0f} tok/s HF padded generate" if padded else ""
    cmd = "python -m bench.throughput " + " ".join(sys.argv[1:])
    print(
        f"W1: {best['tok_s']:.0f} tok/s ours{hf_part}{ratio}{padded_part}, "
        f"{best['tok_s'] / ceiling:.2f} of ceiling ({results['device']}, {cmd.strip()})"
    )


if __name__ == "__main__":
    main()
