"""One engine step that holds a prompt, through the pieces' CUDA graphs and eagerly, side by side.

    python bench/mixed_step.py                         # GPU: demo model, 15 decoding sequences + a 256-token prompt
    python bench/mixed_step.py --decodes 63 --prompt-len 128
    python bench/mixed_step.py --device cpu --decodes 2 --prompt-len 16 --calls 1 --repeats 1   # CPU smoke run (pieces eager)

engine/mixed_graphs.py replays everything between two attention calls as a
CUDA graph; without it such a step runs eagerly. The same step's forward pass
(already prepared: the inputs are on the device) is timed both ways, median of
--repeats rounds of --calls calls each, and the hidden states compared; a
decode-only step of the same batch through the decode graphs is timed beside
them for scale. Repeating the step rewrites the same K/V, so every call sees
the same cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.device import device_name, sync
from engine import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from engine.engine import LLMEngine
from engine.mixed_graphs import MixedStepGraphs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo-target")
    p.add_argument("--device", default="cuda")
    p.add_argument("--decodes", type=int, default=15)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def timed(fn, calls: int, repeats: int, device: torch.device) -> float:
    """Median ms per call; the device is synchronized around each round."""
    fn()
    rounds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        rounds.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(rounds)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    engine = LLMEngine(
        EngineConfig(
            model=args.model, dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device, async_scheduling=False,
            cache=CacheConfig(num_blocks=4096), scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=2048),
        )
    )
    gen = torch.Generator().manual_seed(0)
    vocab = engine.arch.vocab_size
    params = SamplingParams(max_tokens=512, temperature=0, ignore_eos=True)
    for i in range(args.decodes):
        engine.add_request(f"d{i}", torch.randint(10, vocab, (args.prompt_len,), generator=gen).tolist(), params)
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    runner = engine.runner
    cuda = engine.device.type == "cuda"
    # Off CUDA there are no graphs: the pieces run eagerly, through the same code and buffers.
    pieces = runner.mixed or MixedStepGraphs(engine.model, engine.kv_cache, 2048, capture=False)
    decode = runner.prepare(engine.scheduler.schedule())
    engine.add_request("new", torch.randint(10, vocab, (args.prompt_len,), generator=gen).tolist(), params)
    mixed = runner.prepare(engine.scheduler.schedule())
    assert not mixed.meta.is_decode_only and pieces.fits(len(mixed.positions))

    def graphs() -> torch.Tensor:
        return pieces.run(mixed.input_ids, mixed.positions, mixed.meta)

    def eager() -> torch.Tensor:
        return engine.model(mixed.input_ids, mixed.positions, engine.kv_cache, mixed.meta)

    def decode_step() -> torch.Tensor:
        if runner.graphs is None:
            return engine.model(decode.input_ids, decode.positions, engine.kv_cache, decode.meta)
        return runner.graphs.run(decode.input_ids, decode.positions, decode.meta)

    with torch.inference_mode():
        want, got = eager().float(), graphs().float()
        err = ((got - want).norm() / want.norm()).item()
        result = {
            "device": device_name(engine.device),
            "tokens": len(mixed.positions),
            "mixed_graphs_ms": timed(graphs, args.calls, args.repeats, engine.device),
            "eager_ms": timed(eager, args.calls, args.repeats, engine.device),
            "decode_graph_ms": timed(decode_step, args.calls, args.repeats, engine.device),
            "relative_error": err,
        }
    print(
        f"mixed step on {result['device']} ({args.decodes} decodes + a {args.prompt_len}-token prompt, {result['tokens']} tokens): "
        f"pieces{' as graphs' if cuda else ' (eager: no CUDA)'} {result['mixed_graphs_ms']:.3f} ms, eager {result['eager_ms']:.3f} ms "
        f"({result['eager_ms'] / result['mixed_graphs_ms']:.2f}x); decode-only step of {args.decodes} "
        f"{result['decode_graph_ms']:.3f} ms; |graphs - eager| / |eager| = {err:.2e}"
    )
    if not err < 1e-2:
        raise SystemExit("the graphs' hidden states differ from the eager forward pass")
    return result


if __name__ == "__main__":
    main()
