"""The Triton paged-attention kernels against the torch reference, on the CPU.

The kernels run under the Triton interpreter (TRITON_INTERPRET=1, read when a
kernel is decorated, so it is set before triton_paged is first imported).
The interpreter checks the numbers, not the speed: bench/attention_kernels.py
does that on a GPU. It cannot run bf16 tl.dot (numpy has no bf16), so the
low-precision path is checked in fp16.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.triton_interpreter import interpreted_module  # noqa: E402

from engine.attention.metadata import AttentionMetadata  # noqa: E402
from engine.attention.torch_ref import paged_attention_ref  # noqa: E402

triton = pytest.importorskip("triton")


@pytest.fixture
def tp():
    return interpreted_module("engine.attention.triton_paged", "_decode_kernel")


def make_batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32, seed=0):
    """Random caches, shuffled non-contiguous block tables (0-padded), queries and their metadata."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    max_blocks = max(blocks_per_seq) + 1  # one spare column of padding
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks that nobody owns
    ids = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = ids[used : used + n].int()
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    total = sum(query_lens)
    q = (2 * torch.randn(total, num_heads, head_dim, generator=gen)).to(dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(total, dtype=torch.int64),  # K/V are already in the cache
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
    )
    return q, k_cache, v_cache, meta


def reference(q, k_cache, v_cache, meta, scale):
    return paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, scale)


def assert_close(out, ref, tol=1e-4):
    assert out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


HEADS = [
    # (num_heads, num_kv_heads, head_dim, block_size)
    (4, 2, 16, 4),
    (4, 4, 32, 8),
    (6, 2, 16, 16),  # group of 3: padded to 4 rows per query
    (8, 1, 16, 8),  # group of 8
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", HEADS)
def test_prefill_matches_reference(tp, num_heads, num_kv_heads, head_dim, block_size):
    # seq_len 1; no prefix (q_len == seq_len, not a multiple of the block size);
    # a cached prefix (chunked prefill); more new tokens than one query tile.
    seq_lens = [1, 13, 29, 9, 150]
    query_lens = [1, 13, 6, 1, 140]
    q, k_cache, v_cache, meta = make_batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size)
    scale = head_dim**-0.5
    out = tp.paged_prefill_attention(
        q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, meta.max_query_len, scale
    )
    assert_close(out, reference(q, k_cache, v_cache, meta, scale))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_model_head_dims(tp, head_dim):
    q, k_cache, v_cache, meta = make_batch([37, 20], [37, 5], 4, 2, head_dim, 16, seed=1)
    scale = head_dim**-0.5
    out = tp.paged_prefill_attention(
        q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, meta.max_query_len, scale
    )
    assert_close(out, reference(q, k_cache, v_cache, meta, scale))


def test_prefill_reads_strided_q(tp):
    """q as a view into a fused qkv projection output, as the model hands it over."""
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    _, k_cache, v_cache, meta = make_batch([20, 7], [12, 7], num_heads, num_kv_heads, head_dim, 4, seed=2)
    qkv = torch.randn(19, num_heads + 2 * num_kv_heads, head_dim)
    q = qkv[:, :num_heads]
    assert not q.is_contiguous()
    out = tp.paged_prefill_attention(
        q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, meta.max_query_len, 0.25
    )
    assert_close(out, reference(q, k_cache, v_cache, meta, 0.25))


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", HEADS)
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
def test_decode_matches_reference(tp, num_heads, num_kv_heads, head_dim, block_size, num_splits):
    # 8 splits over 1..~70 tokens leaves some splits empty: they must weigh nothing.
    seq_lens = [1, 17, 70, 64, 5]
    q, k_cache, v_cache, meta = make_batch(seq_lens, [1] * 5, num_heads, num_kv_heads, head_dim, block_size)
    scale = head_dim**-0.5
    out = tp.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, num_splits=num_splits)
    assert_close(out, reference(q, k_cache, v_cache, meta, scale))


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", HEADS)
@pytest.mark.parametrize("num_splits", [3, 8])
def test_decode_combined_by_its_last_split_equals_the_combine_kernel(tp, num_heads, num_kv_heads, head_dim, block_size, num_splits):
    # With arrival counters the last split of each (token, KV head) combines; same math, same bits,
    # and every counter back at zero for the next call (a graph's next replay, the next layer).
    seq_lens = [1, 17, 70, 64, 5]
    q, k_cache, v_cache, meta = make_batch(seq_lens, [1] * 5, num_heads, num_kv_heads, head_dim, block_size)
    scale = head_dim**-0.5
    args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, num_splits)
    counters = torch.zeros(5 * num_kv_heads + 3, dtype=torch.int32)
    fused = tp.paged_decode_attention(*args, split_counters=counters)
    assert torch.equal(fused, tp.paged_decode_attention(*args))
    assert not counters.any()
    assert torch.equal(tp.paged_decode_attention(*args, split_counters=counters), fused)
    with pytest.raises(ValueError, match="split_counters"):
        tp.paged_decode_attention(*args, split_counters=counters[: 5 * num_kv_heads - 1])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_model_head_dims(tp, head_dim):
    q, k_cache, v_cache, meta = make_batch([200, 3], [1, 1], 4, 2, head_dim, 16, seed=3)
    scale = head_dim**-0.5
    ref = reference(q, k_cache, v_cache, meta, scale)
    for num_splits in (1, 4):
        out = tp.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, num_splits)
        assert_close(out, ref)


def test_decode_agrees_with_prefill_of_one_token(tp):
    q, k_cache, v_cache, meta = make_batch([33, 8, 1], [1, 1, 1], 4, 2, 16, 8, seed=4)
    decode = tp.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.3, num_splits=2)
    prefill = tp.paged_prefill_attention(
        q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, 1, 0.3
    )
    assert_close(decode, prefill, tol=1e-5)


def test_decode_fp16(tp):
    """The low-precision path (q cast to the cache dtype, P cast for the second dot) in fp16."""
    q, k_cache, v_cache, meta = make_batch([40, 9], [1, 1], 4, 2, 32, 8, dtype=torch.float16, seed=5)
    scale = 32**-0.5
    ref = reference(q, k_cache, v_cache, meta, scale)
    for num_splits in (1, 3):
        out = tp.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, num_splits)
        assert out.dtype == torch.float16
        assert_close(out, ref, tol=5e-3)


def test_prefill_fp16(tp):
    q, k_cache, v_cache, meta = make_batch([40, 9], [24, 9], 4, 2, 32, 8, dtype=torch.float16, seed=6)
    scale = 32**-0.5
    out = tp.paged_prefill_attention(
        q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, meta.max_query_len, scale
    )
    assert out.dtype == torch.float16
    assert_close(out, reference(q, k_cache, v_cache, meta, scale), tol=5e-3)


def test_decode_empty_context_gives_zeros(tp):
    """A CUDA-graph padding row (seq_len 0) must not produce NaN, split or not."""
    q, k_cache, v_cache, meta = make_batch([12, 5], [1, 1], 4, 2, 16, 4, seed=7)
    seq_lens = meta.seq_lens.clone()
    seq_lens[1] = 0
    for num_splits in (1, 4):
        out = tp.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, seq_lens, 0.25, num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out).all()


def test_decode_num_splits_heuristic(tp):
    # Enough (sequence, KV head) pairs to fill an H100: no split.
    assert tp.decode_num_splits(batch=256, num_kv_heads=8, max_seq_len=2048, num_sms=132) == 1
    # One long sequence: many splits, but capped.
    assert 16 <= tp.decode_num_splits(batch=1, num_kv_heads=8, max_seq_len=4096, num_sms=132) <= 64
    assert tp.decode_num_splits(batch=1, num_kv_heads=1, max_seq_len=1 << 20, num_sms=132) == 64
    # Short contexts are not split below one tile (64 tokens) a split.
    assert tp.decode_num_splits(batch=1, num_kv_heads=8, max_seq_len=256, num_sms=132) == 4
    assert tp.decode_num_splits(batch=1, num_kv_heads=8, max_seq_len=100, num_sms=132) == 1
    assert tp.decode_num_splits(batch=1, num_kv_heads=8, max_seq_len=16, num_sms=132) == 1
    # Preloaded launches' wide tiles: a split's share is at least one of them.
    assert tp.decode_num_splits(batch=1, num_kv_heads=8, max_seq_len=272, num_sms=132, min_split_tokens=256) == 1
    assert tp.decode_num_splits(batch=1, num_kv_heads=8, max_seq_len=4096, num_sms=132, min_split_tokens=256) == 16


@pytest.mark.parametrize("head_dim", [24, 8])
def test_rejects_unsupported_head_dim(tp, head_dim):
    q, k_cache, v_cache, meta = make_batch([5], [1], 2, 1, head_dim, 4)
    with pytest.raises(ValueError, match="head_dim"):
        tp.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.5)
    with pytest.raises(ValueError, match="head_dim"):
        tp.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, 1, 0.5)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", HEADS)
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_decode_of_uniform_query_len_matches_reference(tp, num_heads, num_kv_heads, head_dim, block_size, num_splits):
    """A verify pass: every sequence feeds 3 new tokens, each a causal decode query of its own.
    The first sequence's context is the 3 new tokens alone (a padding row of the verify graph)."""
    seq_lens = [3, 17, 70, 9]
    q, k_cache, v_cache, meta = make_batch(seq_lens, [3] * 4, num_heads, num_kv_heads, head_dim, block_size, seed=8)
    scale = head_dim**-0.5
    out = tp.paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, num_splits=num_splits, query_len=3
    )
    assert_close(out, reference(q, k_cache, v_cache, meta, scale))


def test_decode_rejects_tokens_not_a_multiple_of_query_len(tp):
    q, k_cache, v_cache, meta = make_batch([9, 5], [2, 2], 4, 2, 16, 4)
    with pytest.raises(ValueError, match="query_len=3"):
        tp.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.5, query_len=3)


# ----- the new tokens' rotary inside the decode kernel (DecodeRope) ----------------------------


def rotary_tables(positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rope_cases() -> list[tuple]:
    """fp32 over every head layout and split count; fp16 (the rounding that could differ), plain and
    with each preload tile, over every head layout with the split counts taking turns: each interpreted
    case costs CI about 1.5 s, and the full grid of the two was 48 of them."""
    splits = [1, 3, 8]
    cases = [(*heads, n, torch.float32, None) for heads in HEADS for n in splits]
    for j, tile in enumerate((None, 16, 256)):
        cases += [(*heads, splits[(i + j) % 3], torch.float16, tile) for i, heads in enumerate(HEADS)]
    return cases


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,num_splits,dtype,preload_tile", _rope_cases())
def test_decode_with_rope_equals_rope_and_cache_then_decode(tp, num_heads, num_kv_heads, head_dim, block_size, num_splits,
                                                            dtype, preload_tile, monkeypatch):
    # The raw q, k, v as views of one qkv output; the new token of each sequence at position seq_len - 1.
    # preload_tile: each split's first tile (of that many tokens) read before the new key and value
    # are written, the stale row replaced; with 16 the new position also falls in later tiles. The
    # unfused call then walks tiles of the same length: the same sums in the same order.
    if preload_tile is not None:
        monkeypatch.setattr(tp, "_DECODE_PRELOAD", True)
        monkeypatch.setattr(tp, "_DECODE_PRELOAD_BLOCK_N", preload_tile)
        monkeypatch.setattr(tp, "_DECODE_BLOCK_N", preload_tile)
    ops = interpreted_module("engine.model.triton_ops", "_rope_and_cache_kernel")
    seq_lens = [1, 17, 70, 64, 5]
    _, k_cache, v_cache, meta = make_batch(seq_lens, [1] * 5, num_heads, num_kv_heads, head_dim, block_size, dtype)
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = (x.view(5, -1, head_dim) for x in (q, k, v))
    positions = torch.tensor(seq_lens, dtype=torch.int64) - 1
    slots = torch.stack([meta.block_tables[b, p // block_size].long() * block_size + p % block_size
                         for b, p in enumerate(positions.tolist())])
    cos, sin = rotary_tables(80, head_dim)
    scale = head_dim**-0.5
    k_a, v_a = k_cache.clone(), v_cache.clone()
    q_rot = ops.rope_and_cache(q, k, v, cos, sin, positions, None, None, 0.0, k_a, v_a, slots)
    unfused = tp.paged_decode_attention(q_rot, k_a, v_a, meta.block_tables, meta.seq_lens, scale, num_splits=num_splits)
    k_b, v_b = k_cache.clone(), v_cache.clone()
    rope = tp.DecodeRope(k, v, cos, sin, positions, slots)
    fused = tp.paged_decode_attention(q, k_b, v_b, meta.block_tables, meta.seq_lens, scale, num_splits=num_splits, rope=rope)
    assert torch.equal(k_b, k_a) and torch.equal(v_b, v_a)  # the same keys and values, in the same slots
    assert torch.equal(fused, unfused)


def test_decode_rope_takes_one_new_token_per_sequence(tp):
    q, k_cache, v_cache, meta = make_batch([9, 9], [2, 2], 4, 2, 16, 4)
    k = torch.zeros(4, 2, 16)
    cos, sin = rotary_tables(16, 16)
    rope = tp.DecodeRope(k, k.clone(), cos, sin, torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="one new token"):
        tp.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.25, query_len=2, rope=rope)
