"""Chooses the attention implementation for a tensor's device."""

from __future__ import annotations

import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import paged_attention_ref


def write_kv(
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Stores the new tokens' K/V in their cache slots (graph-safe: no host sync)."""
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,  # [T, H, D]: where to write the result (a graph's static buffer)
) -> torch.Tensor:
    if q.is_cuda:
        from engine.attention import triton_paged

        if not meta.is_decode_only:
            return triton_paged.paged_prefill_attention(
                q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, meta.max_query_len, scale,
                out=out,
            )
        result = triton_paged.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
    else:
        result = paged_attention_ref(q, k_cache, v_cache, meta, scale)
    return result if out is None else out.copy_(result)
