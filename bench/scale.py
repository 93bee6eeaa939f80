"""How W1 throughput and KV memory grow with the request count and the prompt length.

    python bench/scale.py                       # 64 / 256 / 1024 requests, then long prompts; writes a PNG
    python bench/scale.py --preset tiny-qwen3 --configs 4:5-40,8:5-40 --output-len 4   # CPU smoke run

One engine serves every configuration (same weights, same KV pool), so the
rows differ only in the workload. Each row: tok/s, fraction of the ceiling,
peak KV in use, preemptions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.ceiling import measure_device_rates, offline_floor_seconds, weight_bytes
from bench.workloads import offline_workload
from engine import EngineConfig, SamplingParams, SchedulerConfig
from engine.engine import LLMEngine
from engine.model.presets import preset_config, save_hf_checkpoint


def parse_configs(text: str) -> list[tuple[int, int, int]]:
    """"64:100-1024,1024:100-1024" -> [(64, 100, 1024), (1024, 100, 1024)]"""
    out = []
    for item in text.split(","):
        n, lens = item.split(":")
        lo, hi = lens.split("-")
        out.append((int(n), int(lo), int(hi)))
    return out


def run_config(engine: LLMEngine, n: int, lo: int, hi: int, output_len: int, vocab: int, rates, n_params: int) -> dict:
    work = offline_workload(n, lo, hi, output_len, vocab)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    before = engine.stats().num_preemptions
    peak_blocks = 0
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i, p in enumerate(work.prompts):
        engine.add_request(f"scale-{n}-{lo}-{i}", p, params)
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
        peak_blocks = max(peak_blocks, engine.allocator.pool.num_usable_blocks - engine.allocator.num_free_blocks)
    sync()
    seconds = time.perf_counter() - start
    floor = offline_floor_seconds(engine.arch, weight_bytes(engine.model), n_params, work.prompt_lens, output_len, rates)
    block_bytes = engine.kv_cache[:, :, 0].numel() * engine.kv_cache.element_size()
    return {
        "requests": n, "prompt_len": f"{lo}-{hi}", "tok_s": tokens / seconds, "seconds": seconds,
        "ceiling_fraction": (tokens / seconds) * floor / work.total_output_tokens,
        "peak_kv_gib": peak_blocks * block_bytes / 2**30,
        "kv_pool_gib": engine.kv_cache.numel() * engine.kv_cache.element_size() / 2**30,
        "preemptions": engine.stats().num_preemptions - before,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--configs", default="64:100-1024,256:100-1024,1024:100-1024,64:4096-8192")
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("runs/scale"))
    args = p.parse_args(argv)
    configs = parse_configs(args.configs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    vocab = preset_config(args.preset)["vocab_size"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = save_hf_checkpoint(args.preset, Path(tmp) / "model", seed=0, dtype=dtype)
        engine = LLMEngine(EngineConfig(
            model=str(path), max_model_len=max(hi for _, _, hi in configs) + args.output_len + 16,
            scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=8192),
        ))
        rates = measure_device_rates(device)
        n_params = sum(t.numel() for t in engine.model.parameters())
        engine.generate([[11] * 8], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
        for n, lo, hi in configs:
            rows.append(run_config(engine, n, lo, hi, args.output_len, vocab, rates, n_params))
            r = rows[-1]
            print(f"{n:>6} requests, prompts {lo}-{hi}: {r['tok_s']:8.0f} tok/s, {r['ceiling_fraction']:.2f} of ceiling, "
                  f"peak KV {r['peak_kv_gib']:.1f} of {r['kv_pool_gib']:.1f} GiB, {r['preemptions']} preemptions", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(rows, indent=2))
    _plot(rows, args.out / "scale.png", torch.cuda.get_device_name() if device.type == "cuda" else "CPU")
    return rows


def _plot(rows: list[dict], path: Path, device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in sorted({r["prompt_len"] for r in rows}):
        pts = [(r["requests"], r["tok_s"]) for r in rows if r["prompt_len"] == label]
        ax.plot(*zip(*pts), marker="o", label=f"prompts {label}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests submitted at once")
    ax.set_ylabel("output tok/s")
    ax.set_title(f"W1 throughput vs request count ({device})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
