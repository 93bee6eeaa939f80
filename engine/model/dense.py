"""Whole-sequence forward passes outside the engine: perplexity, calibration, checks."""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.model.llama import LlamaForCausalLM


@torch.no_grad()
def forward_full_sequence(model: LlamaForCausalLM, token_ids: list[int] | torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """Logits [len, vocab] (fp32) for every position of one sequence, through the paged path."""
    param = next(model.parameters())
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=param.device)
    n = ids.numel()
    arch = model.arch
    num_blocks = -(-n // block_size)
    kv_cache = torch.zeros(
        arch.num_layers, 2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim,
        dtype=param.dtype, device=param.device,
    )
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=param.device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=param.device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=param.device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=param.device)[None],
        max_query_len=n,
        max_seq_len=n,
        query_lens_cpu=[n],
        seq_lens_cpu=[n],
    )
    hidden = model(ids, torch.arange(n, device=param.device), kv_cache, meta)
    return model.compute_logits(hidden)
