"""On the GPU: chained speculative steps give the synchronous steps' tokens (fp32, the bundled pair).

A chained step (engine/spec/chain.py) is the synchronous speculative step computed
ahead on the device, in one CUDA graph per batch bucket and mode; so an engine with
async scheduling must give the same tokens as one without, for greedy requests and
for seeded sampled ones (temperature alone, and cut to a top-k or a top-p). Each
case runs a batch of 1 and a batch of 12 (padded into the 16-row graphs) and prints
one line; the script exits 1 if any case disagrees or never chained.

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


def outputs(args, chained: bool, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[list[int]], int]:
    """(every request's tokens, chained steps) of one engine."""
    engine = LLMEngine(
        EngineConfig(
            model=args.target, dtype="float32", device=args.device, async_scheduling=chained,
            speculative=SpeculativeConfig(method="draft", draft_model=args.draft, num_speculative_tokens=args.k),
        )
    )
    if chained and engine._spec_chain is None:
        raise SystemExit("this engine does not chain speculative steps (CUDA graphs off?)")
    tokens = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    chained_steps = engine.stats().spec_chained_steps
    del engine
    free_memory()  # the next engine sizes its KV cache from what is free
    return tokens, chained_steps


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
    failures = 0
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [torch.randint(3, 4000, (int(n),), generator=gen).tolist() for n in torch.randint(4, 96, (batch,), generator=gen)]
        for name, knobs in CASES.items():
            seeded = knobs["temperature"] > 0
            params = [
                SamplingParams(max_tokens=args.output_len, ignore_eos=True, seed=i if seeded else None, **knobs)
                for i in range(batch)
            ]
            sync, _ = outputs(args, False, prompts, params)
            chained, steps = outputs(args, True, prompts, params)
            same = sum(a == b for a, b in zip(chained, sync))
            ok = same == batch and steps > 0
            failures += not ok
            print(
                f"batch {batch:<3} {name:<12} {same}/{batch} sequences equal to synchronous steps, "
                f"{steps} chained steps" + ("" if ok else "  MISMATCH"),
                flush=True,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
