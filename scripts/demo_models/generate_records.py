"""The target's own greedy continuations of training-corpus windows: data to distil a draft on.

A draft's proposals are kept when they match what the target itself would write.
Trained on corpus text, the draft learns the corpus; trained on the target's
continuations (sequence-level distillation), it learns the target, whose quirks
(repetition, favourite identifiers) are exactly what it must predict. The
continuations come from the serving engine itself (greedy, batched), so this is
fast on a GPU.

    python -m scripts.demo_models.generate_records --num 32768 --out /tmp/records.pt
    python -m scripts.demo_models.train --preset draft --init-from models/demo-draft \
        --distill-from models/demo-target --train-records /tmp/records.pt --time-budget 120 --out /tmp/draft

Writes a [num, prompt_tokens + output_tokens] int32 tensor (torch.save): each row
a corpus window followed by the target's continuation of it.
"""

from __future__ import annotations

import argparse
import time

from scripts.demo_models.common import tokenize_corpus  # sets the offline env vars first

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="models/demo-target")
    ap.add_argument("--corpus", default=".corpus/train.txt.gz")
    ap.add_argument("--tokenizer", default="models/demo-tokenizer")
    ap.add_argument("--num", type=int, default=32768, help="windows (rows) to continue")
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from engine import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig

    t0 = time.time()
    stream = tokenize_corpus(args.corpus, args.tokenizer)
    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(stream) - args.prompt_tokens, (args.num,), generator=gen)
    prompts = stream[starts[:, None] + torch.arange(args.prompt_tokens)]
    print(f"{args.num} windows of {args.prompt_tokens} tokens from {len(stream):,} in {time.time() - t0:.1f} s", flush=True)

    context = args.prompt_tokens + args.output_tokens
    engine = LLMEngine(EngineConfig(
        model=args.target, dtype=args.dtype, device=args.device, max_model_len=context,
        cache=CacheConfig(enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=16384),
    ))
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0, ignore_eos=True)
    t1 = time.time()
    outputs = engine.generate(prompts.tolist(), params)
    seconds = time.time() - t1
    continuations = torch.tensor([o.outputs[0].token_ids for o in outputs], dtype=torch.int32)
    records = torch.cat([prompts.to(torch.int32), continuations], dim=1)
    torch.save(records, args.out)
    print(f"{args.num * args.output_tokens:,} tokens generated in {seconds:.1f} s "
          f"({args.num * args.output_tokens / seconds:,.0f} tok/s); saved {tuple(records.shape)} to {args.out}", flush=True)


if __name__ == "__main__":
    main()
