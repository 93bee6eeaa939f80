"""On the GPU: chained speculative steps give the synchronous steps' tokens (fp32, the bundled pair).

A chained step (engine/spec/chain.py) is the synchronous speculative step computed
ahead on the device, in one CUDA graph per batch bucket and mode; so an engine with
async scheduling must give the same tokens as one without, for greedy requests and
for seeded sampled ones (temperature alone, and cut to a top-k or a top-p). Each
case runs a batch of 1 and a batch of 12 (padded into the 16-row graphs), all
through one engine of each kind, and prints one line; the script exits 1 if any
case disagrees or never chained.

    python bench/spec_chain_check.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.device import free_memory
from engine import EngineConfig, SamplingParams, SpeculativeConfig
from engine.engine import LLMEngine

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top-k": dict(temperature=0.8, top_k=20),
    "top-p": dict(temperature=0.8, top_p=0.9),
}


def make_engine(args, chained: bool) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig(
            model=args.target, dtype="float32", device=args.device, async_scheduling=chained,
            speculative=SpeculativeConfig(method="draft", draft_model=args.draft, num_speculative_tokens=args.k),
        )
    )
    if chained and engine._spec_chain is None:
        raise SystemExit("this engine does not chain speculative steps (CUDA graphs off?)")
    return engine


def run_cases(args, chained: bool, workloads: dict[str, tuple[list, list]]) -> dict[str, tuple[list[list[int]], int]]:
    """Per case: (every request's tokens, chained steps), all cases through one engine."""
    engine = make_engine(args, chained)
    results = {}
    for name, (prompts, params) in workloads.items():
        before = engine.stats().spec_chained_steps
        tokens = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
        results[name] = (tokens, engine.stats().spec_chained_steps - before)
    del engine
    free_memory()  # the next engine sizes its KV cache from what is free
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(ROOT / "models/demo-target"))
    p.add_argument("--draft", default=str(ROOT / "models/demo-draft"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--batch-sizes", default="1,12")
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    workloads = {}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        lengths = torch.randint(4, 96, (batch,), generator=gen).tolist()
        prompts = [torch.randint(3, 4000, (n,), generator=gen).tolist() for n in lengths]
        for name, knobs in CASES.items():
            seeded = knobs["temperature"] > 0
            params = [
                SamplingParams(max_tokens=args.output_len, ignore_eos=True, seed=i if seeded else None, **knobs)
                for i in range(batch)
            ]
            workloads[f"batch {batch:<3} {name}"] = (prompts, params)
    sync = run_cases(args, False, workloads)
    chained = run_cases(args, True, workloads)
    failures = 0
    for name, (prompts, _) in workloads.items():
        (want, _), (got, steps) = sync[name], chained[name]
        same = sum(a == b for a, b in zip(got, want))
        ok = same == len(prompts) and steps > 0
        failures += not ok
        print(
            f"{name:<22} {same}/{len(prompts)} sequences equal to synchronous steps, {steps} chained steps"
            + ("" if ok else "  MISMATCH"),
            flush=True,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
