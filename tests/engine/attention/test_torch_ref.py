"""The torch paged-attention reference against plain dense causal attention, and write_kv's slots."""

from __future__ import annotations

import pytest
import torch

from engine.attention.backend import paged_attention, write_kv
from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import paged_attention_ref


def dense_attention(q, k, v, scale):
    """q [L, H, D] for the last L of S positions; k, v [S, KVH, D]; causal; fp64."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).double()
    v = v.repeat_interleave(group, dim=1).double()
    q_len, s = q.shape[0], k.shape[0]
    scores = torch.einsum("lhd,shd->hls", q.double(), k) * scale
    mask = torch.arange(s)[None, :] > torch.arange(s - q_len, s)[:, None]
    scores = scores.masked_fill(mask[None], float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v)


def build_case(seq_lens, query_lens, block_size, num_heads=4, num_kv_heads=2, head_dim=8, num_blocks=40, seed=0):
    """Random K/V of every sequence scattered over random blocks; the metadata of one step."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 stays the null block
    tables, dense_kv = [], []
    for s in seq_lens:
        n = -(-s // block_size)
        ids = [free.pop() for _ in range(n)]
        tables.append(ids)
        dense_kv.append((k_cache[ids].reshape(-1, num_kv_heads, head_dim)[:s], v_cache[ids].reshape(-1, num_kv_heads, head_dim)[:s]))
    width = max(len(t) for t in tables)
    qsl = [0]
    for ql in query_lens:
        qsl.append(qsl[-1] + ql)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(qsl[-1], dtype=torch.int64),  # unused by the reference itself
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
    )
    q = torch.randn(qsl[-1], num_heads, head_dim, generator=gen)
    return q, k_cache, v_cache, meta, dense_kv


@pytest.mark.parametrize(
    "seq_lens, query_lens, block_size",
    [
        ([1], [1], 4),  # a one-token prompt
        ([17, 5, 33], [17, 5, 33], 4),  # prefills of mixed lengths
        ([17, 5, 33], [1, 1, 1], 4),  # decodes
        ([40, 9, 16, 3], [7, 1, 16, 2], 8),  # chunks of prompts mixed with decodes
        ([64, 31], [64, 1], 16),
    ],
)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_reference_equals_dense_causal_attention(seq_lens, query_lens, block_size, num_heads, num_kv_heads):
    q, k_cache, v_cache, meta, dense_kv = build_case(seq_lens, query_lens, block_size, num_heads, num_kv_heads)
    scale = 8**-0.5
    out = paged_attention_ref(q, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    start = 0
    for (k, v), ql in zip(dense_kv, query_lens):
        want = dense_attention(q[start : start + ql], k, v, scale)
        torch.testing.assert_close(out[start : start + ql].double(), want, rtol=1e-5, atol=1e-5)
        start += ql
    # On the CPU the backend is the reference.
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, meta, scale), out)


def test_tokens_past_the_sequence_in_its_last_block_are_ignored():
    q, k_cache, v_cache, meta, _ = build_case([6], [2], 4)
    before = paged_attention_ref(q, k_cache, v_cache, meta, 0.5)
    last_block = meta.block_tables[0, 1].item()
    k_cache[last_block, 2:] = 1e4  # slots 6 and 7: not part of the sequence
    v_cache[last_block, 2:] = 1e4
    k_cache[0] = 1e4  # the null block the table is padded with
    torch.testing.assert_close(paged_attention_ref(q, k_cache, v_cache, meta, 0.5), before)


def test_causal_mask_within_a_chunk():
    q, k_cache, v_cache, meta, _ = build_case([8], [3], 4)
    before = paged_attention_ref(q, k_cache, v_cache, meta, 0.5)
    # Position 7 (the last) is seen by the last query only.
    block, offset = meta.block_tables[0, 1].item(), 3
    v_cache[block, offset] += 100.0
    after = paged_attention_ref(q, k_cache, v_cache, meta, 0.5)
    torch.testing.assert_close(after[:2], before[:2])
    assert (after[2] - before[2]).abs().max() > 1.0


def test_half_precision_inputs_give_half_precision_outputs_close_to_fp32():
    q, k_cache, v_cache, meta, _ = build_case([12, 7], [12, 1], 4)
    full = paged_attention_ref(q, k_cache, v_cache, meta, 0.3)
    half = paged_attention_ref(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), meta, 0.3)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)


def test_write_kv_stores_each_token_at_its_slot():
    num_blocks, block_size, kvh, d = 6, 4, 2, 3
    k_cache = torch.zeros(num_blocks, block_size, kvh, d)
    v_cache = torch.zeros(num_blocks, block_size, kvh, d)
    k = torch.randn(5, kvh, d)
    v = torch.randn(5, kvh, d)
    slots = torch.tensor([4 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 5 * 4 + 2, 1 * 4 + 0])
    write_kv(k, v, k_cache, v_cache, slots)
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache[slot // 4, slot % 4], k[t])
        assert torch.equal(v_cache[slot // 4, slot % 4], v[t])
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots] = True
    assert (k_cache.view(-1, kvh, d)[~written] == 0).all()
    assert (v_cache.view(-1, kvh, d)[~written] == 0).all()
