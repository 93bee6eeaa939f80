"""Host (Python) time of a decode step, measured on the CPU, split by phase.

On the GPU a decode step at batch 256 spends milliseconds in Python while the
device waits (bench/step_profile.py shows the gap). This script runs the same
engine on the CPU with a tiny model and times the forward pass apart, so what
is left is the host work a GPU step pays too. From the repository root:

    PYTHONPATH=. python bench/host_profile.py                                # tiny-qwen3, batch 256, W1 prompt lengths
    PYTHONPATH=. python bench/host_profile.py --only-finished                # the steps generate() runs (W1)
    PYTHONPATH=. python bench/host_profile.py --tokenizer models/demo-target # with detokenization, as when serving text
    PYTHONPATH=. python bench/host_profile.py --cprofile 30                  # plus the 30 costliest functions
    PYTHONPATH=. python bench/host_profile.py --async-scheduling             # the overlapped step's host work

"host total" is the step minus the forward: schedule + prepare + sample + the
rest (bookkeeping, appending tokens, outputs). The forward runs on the CPU
here, so its figure says nothing about the GPU. The best of --repeats runs is
reported: other processes on the machine only ever add time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from bench.workloads import offline_workload
from engine import EngineConfig, SamplingParams, SchedulerConfig
from engine.config import CacheConfig
from engine.engine import LLMEngine
from engine.model.presets import preset_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-qwen3")
    p.add_argument("--tokenizer", default=None, help="a folder with a tokenizer: detokenize every token")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16, help="decode steps per measured run")
    p.add_argument("--repeats", type=int, default=6, help="measured runs; the best one is reported")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: the forward's threads do not spin on the host's core)"
    )
    p.add_argument("--only-finished", action="store_true", help="step(only_finished=True), as generate() runs it")
    p.add_argument(
        "--async-scheduling", action="store_true",
        help="EngineConfig.async_scheduling: the same host work, which a GPU would overlap with its forward",
    )
    p.add_argument("--cprofile", type=int, default=0, help="print this many functions of a cProfile run")
    return p.parse_args(argv)


def build_engine(args: argparse.Namespace) -> LLMEngine:
    vocab = preset_config(args.preset)["vocab_size"]
    if args.tokenizer:  # prompts and outputs must be ids the tokenizer knows
        from engine.tokenizer import load_tokenizer

        vocab = min(vocab, len(load_tokenizer(args.tokenizer)))
    # Room for every step this script runs (warm-up, measured runs, the cProfile run), within the preset's context.
    room = 16 + args.steps * (args.repeats + 2)
    max_len = preset_config(args.preset)["max_position_embeddings"]
    prompt_max = min(args.max_len, max_len - room)
    config = EngineConfig(
        model=f"preset:{args.preset}",
        tokenizer=args.tokenizer,
        device="cpu",
        max_model_len=max_len,
        cache=CacheConfig(cpu_kv_cache_bytes=2**30),
        scheduler=SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=8192),
        async_scheduling=args.async_scheduling,
    )
    engine = LLMEngine(config)
    work = offline_workload(args.batch, min(args.min_len, prompt_max), prompt_max, 1, vocab)
    params = SamplingParams(max_tokens=max_len - prompt_max, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(work.prompts):
        engine.add_request(f"host-{i}", prompt, params)
    # Prefill everything, so every measured step is a pure decode of the whole batch.
    while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
        engine.step()
    return engine


class PhaseTimer:
    """Wraps a few of the engine's methods (once per step each, so the wrapping costs nothing
    measurable) and sums the time spent inside them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return timed


class _TimedSampler:
    """The engine calls its sampler as a function; special methods are looked up on the
    type, so the instance is swapped for this stand-in rather than patched."""

    def __init__(self, sampler: Any, timer: PhaseTimer) -> None:
        self._call = timer.wrap("sample", sampler.__call__)
        self.launch = timer.wrap("sample", sampler.launch)  # async scheduling: the tokens are read back in "other"
        self._sampler = sampler

    def __call__(self, *args: Any) -> Any:
        return self._call(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)


def timed_steps(engine: LLMEngine, steps: int, only_finished: bool = False) -> float:
    """Seconds per step over `steps` decode steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step(only_finished)
    return (time.perf_counter() - t0) / steps


def phase_split(engine: LLMEngine, steps: int, only_finished: bool) -> dict[str, float]:
    """Milliseconds per step in each phase; 'forward' is execute minus prepare."""
    timer = PhaseTimer()
    runner, scheduler, sampler = engine.runner, engine.scheduler, engine.sampler
    scheduler.schedule = timer.wrap("schedule", scheduler.schedule)
    # The step's arrays on the host, then on the device (runner.prepare is the two in a row).
    runner._host_inputs = timer.wrap("prepare", runner._host_inputs)
    runner._to_device = timer.wrap("prepare", runner._to_device)
    runner.execute = timer.wrap("execute", runner.execute)
    engine.sampler = _TimedSampler(sampler, timer)
    try:
        total = timed_steps(engine, steps, only_finished)
    finally:
        del scheduler.schedule, runner._host_inputs, runner._to_device, runner.execute
        engine.sampler = sampler
    ms = {k: v / steps * 1e3 for k, v in timer.seconds.items()}
    forward = ms.pop("execute") - ms["prepare"]
    ms["other (bookkeeping, outputs)"] = total * 1e3 - forward - sum(ms.values())
    ms["host total"] = total * 1e3 - forward
    ms["forward (CPU)"] = forward
    ms["step total"] = total * 1e3
    return ms


def cprofile_steps(engine: LLMEngine, steps: int, top: int, only_finished: bool) -> str:
    prof = cProfile.Profile()
    prof.enable()
    timed_steps(engine, steps, only_finished)
    prof.disable()
    buf = io.StringIO()
    # The CPU forward would fill the list: leave out the model, the attention and torch's own calls.
    not_forward = (
        r"^(?!.*(engine/model/|engine/attention/torch_ref|torch/nn/|torch\._C\._nn"
        r"|method '(?!tolist)\w+' of 'torch\._C\.TensorBase))"
    )
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(not_forward, top)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = build_engine(args)
    timed_steps(engine, 4)  # warm-up
    batch = len(engine.scheduler.running)
    runs = [phase_split(engine, args.steps, args.only_finished) for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r["host total"])
    mode = "step(only_finished=True)" if args.only_finished else "step()"
    if engine.async_scheduling:
        mode += " with async scheduling"
    print(
        f"decode {mode} at batch {batch} on the CPU ({args.preset}, tokenizer: {args.tokenizer or 'none'}), "
        "ms per step:"
    )
    for name, ms in best.items():
        print(f"  {name:<30}{ms:8.3f}")
    print(f"  {'host us per sequence':<30}{best['host total'] * 1e3 / batch:8.2f}")
    if args.cprofile:
        print(cprofile_steps(engine, args.steps, args.cprofile, args.only_finished))
    return best


if __name__ == "__main__":
    main()
