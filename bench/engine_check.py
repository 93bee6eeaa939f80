"""On the GPU: our engine's greedy tokens against Hugging Face's, for tiny fp32 models.

Covers the Triton kernels inside the whole engine: CUDA graphs on and off,
EngineConfig.decode_folds and num_scheduler_steps, prefix caching, chunked prefill and preemption. Prints one line per case and
exits 1 if any case disagrees.

    python bench/engine_check.py
    python bench/engine_check.py --cases graphs,graphs+steps
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.device import free_memory
from engine import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from engine.engine import LLMEngine
from engine.model.presets import save_hf_checkpoint


def hf_greedy(path: Path, prompts: list[list[int]], n: int, device: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    out = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p], device=device), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p) :].tolist())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="", help="comma-separated case names to run (default: all)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 384, (40,), generator=gen).tolist()
    prompts = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in (1, 5, 17, 33, 64, 100)]
    prompts += [shared + torch.randint(3, 384, (n,), generator=gen).tolist() for n in (3, 9)]
    cases = {
        "graphs": dict(),  # with decode_folds, the default: the rotary inside attention (batches of up to 8)
        "graphs-unfolded": dict(decode_folds=False),
        "graphs+steps": dict(num_scheduler_steps=5),  # decode passes after each launch (async: the CUDA default)
        "steps+folds+preempt": dict(
            num_scheduler_steps=3,
            cache=CacheConfig(block_size=16, num_blocks=14),
            scheduler=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8),
        ),
        "eager": dict(enforce_eager=True),
        "no-prefix-cache": dict(cache=CacheConfig(block_size=16, enable_prefix_caching=False)),
        "chunked+preempt": dict(
            cache=CacheConfig(block_size=16, num_blocks=14),
            scheduler=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8),
        ),
    }
    if args.cases:
        unknown = set(args.cases.split(",")) - set(cases)
        if unknown:
            raise SystemExit(f"unknown cases {sorted(unknown)}; known: {', '.join(cases)}")
        cases = {name: cases[name] for name in args.cases.split(",")}
    failures = 0
    n_new = 24
    for preset in ("tiny-llama", "tiny-qwen2", "tiny-qwen3"):
        with tempfile.TemporaryDirectory() as tmp:
            path = save_hf_checkpoint(preset, Path(tmp) / "m", seed=0, initializer_range=0.2)
            ref = hf_greedy(path, prompts, n_new, device)
            for name, extra in cases.items():
                engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", device=device, **extra))
                outs = engine.generate(prompts, SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True))
                got = [o.outputs[0].token_ids for o in outs]
                same = sum(g == r for g, r in zip(got, ref))
                stats = engine.stats()
                ok = same == len(prompts)
                failures += not ok
                print(
                    f"{preset:<12} {name:<16} {same}/{len(prompts)} sequences equal to HF "
                    f"(preemptions {stats.num_preemptions}, prefix hits {stats.prefix_cache_hit_tokens} tokens)"
                    + ("" if ok else "  MISMATCH"),
                    flush=True,
                )
                del engine
                free_memory()  # the next engine sizes its KV cache from what is free
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
