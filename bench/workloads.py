"""The W1 workload of shared/BENCHMARK.md: random prompts of random lengths, fixed output length."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OfflineWorkload:
    prompts: list[list[int]]
    output_len: int

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def total_output_tokens(self) -> int:
        return len(self.prompts) * self.output_len


def offline_workload(
    num_requests: int, min_len: int, max_len: int, output_len: int, vocab_size: int, seed: int = 0
) -> OfflineWorkload:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (num_requests,), generator=gen).tolist()
    # Stay clear of the low ids where special tokens usually live.
    prompts = [torch.randint(10, vocab_size, (n,), generator=gen).tolist() for n in lens]
    return OfflineWorkload(prompts, output_len)
