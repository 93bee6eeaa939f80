"""The peer: Hugging Face transformers on the same weights and prompts."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.device import sync

from bench.workloads import OfflineWorkload


def _load(path: Path, device: torch.device, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn).to(device).eval()


def hf_generate_batch(path: Path, work: OfflineWorkload, device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """transformers' own continuous batching (generate_batch, paged|sdpa). Returns (seconds, output tokens)."""
    from transformers import GenerationConfig

    model = _load(path, device, dtype, "paged|sdpa")
    cfg = GenerationConfig(max_new_tokens=work.output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=work.prompts[:4], generation_config=cfg)  # warm-up
    sync(device)
    start = time.perf_counter()
    results = model.generate_batch(inputs=work.prompts, generation_config=cfg)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.generated_tokens) for r in results.values())
    del model
    return seconds, tokens


def hf_padded_generate(
    path: Path, work: OfflineWorkload, device: torch.device, dtype: torch.dtype, batch_size: int = 64
) -> tuple[float, int]:
    """Plain `generate` on left-padded batches. Returns (seconds, output tokens)."""
    model = _load(path, device, dtype, "sdpa")
    model.generate(torch.tensor([work.prompts[0][:8]], device=device), max_new_tokens=2, do_sample=False)  # warm-up
    sync(device)
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(work.prompts), batch_size):
        chunk = work.prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=work.output_len, min_new_tokens=work.output_len,
            do_sample=False, pad_token_id=0,
        )
        tokens += (out.shape[1] - width) * len(chunk)
    sync(device)
    seconds = time.perf_counter() - start
    del model
    return seconds, tokens
