"""Chooses the attention implementation for a tensor's device."""

from __future__ import annotations

import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import paged_attention_ref

# Up to this many new tokens per sequence, a pass of uniform query length runs the decode kernel,
# one split query per token (speculative passes: k + 1 tokens); longer ones are prefills.
MAX_DECODE_QUERY_LEN = 8


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
    rope=None,  # triton_paged.DecodeRope: q raw, rotated (and the new K/V written) in the decode kernel
) -> torch.Tensor:
    if rope is not None and not (q.is_cuda and meta.is_decode_only):
        raise ValueError("the rotary runs inside attention only in a CUDA decode pass (one new token a sequence)")
    if not q.is_cuda:
        result = paged_attention_ref(q, k_cache, v_cache, meta, scale)
        return result if out is None else out.copy_(result)
    from engine.attention import triton_paged

    query_len = _decode_query_len(meta)
    if query_len is None:
        return triton_paged.paged_prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, meta.max_query_len, scale,
            out=out,
        )
    result = triton_paged.paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, query_len=query_len,
        split_counters=meta.split_counters, rope=rope,
    )
    return result if out is None else out.copy_(result)


def _decode_query_len(meta: AttentionMetadata) -> int | None:
    """New tokens per sequence when the decode kernel serves the pass; None: a prefill."""
    if meta.is_decode_only:
        return 1
    uniform = meta.uniform_query_len
    return uniform if uniform is not None and uniform <= MAX_DECODE_QUERY_LEN else None
