"""PagedKVAllocator: prefix lookup, slot allocation, block registration, freeing, hit counters."""

from __future__ import annotations

import pytest

from engine.kv_cache.allocator import PagedKVAllocator
from engine.kv_cache.hashing import ROOT_HASH, hash_block, iter_block_hashes
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 4


def make_seq(tokens: list[int], seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(tokens), SamplingParams(), 0.0)


def run_prefill(alloc: PagedKVAllocator, seq: Sequence) -> None:
    """What the scheduler and engine do for a whole prompt: find the prefix, allocate, compute, register."""
    prefix = alloc.find_cached_prefix(seq)
    assert alloc.allocate_slots(seq, seq.num_tokens - prefix.num_tokens, prefix)
    seq.num_computed_tokens = seq.num_tokens
    alloc.cache_full_blocks(seq)


def test_iter_block_hashes_is_the_chain_of_full_blocks():
    tokens = list(range(10))
    hashes = list(iter_block_hashes(tokens, BS))
    h0 = hash_block(ROOT_HASH, tokens[0:4])
    h1 = hash_block(h0, tokens[4:8])
    assert hashes == [h0, h1]  # the partial third block is not hashed
    assert hash_block(ROOT_HASH, [1, 2, 3, 4]) != hash_block(ROOT_HASH, [1, 2, 3, 5])


def test_find_cached_prefix_caps_at_len_minus_one_full_blocks():
    alloc = PagedKVAllocator(32, BS)
    a = make_seq(list(range(100, 112)), 0)  # 3 full blocks
    run_prefill(alloc, a)
    assert len(a.block_hashes) == 3
    cases = {
        1: 0,
        4: 0,  # (4-1)//4 = 0: the only block would leave nothing to compute
        5: 1,
        8: 1,
        9: 2,
        12: 2,  # the same 12 tokens: the last block is recomputed for its logits
        13: 3,
    }
    for n, want_blocks in cases.items():
        tokens = (a.token_ids + [7, 7, 7, 7])[:n]
        prefix = alloc.find_cached_prefix(make_seq(tokens, 1))
        assert prefix.num_tokens == want_blocks * BS, n
        assert prefix.blocks == a.blocks[:want_blocks]
        assert prefix.hashes == a.block_hashes[:want_blocks]


def test_find_cached_prefix_is_a_chain_hash_and_stops_at_the_first_miss():
    alloc = PagedKVAllocator(32, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 0)
    run_prefill(alloc, a)
    # Same second block after a different first block: no hit at all.
    b = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 0], 1)
    assert alloc.find_cached_prefix(b).num_tokens == 0
    assert alloc.pool.lookup(hash_block(hash_block(ROOT_HASH, [9, 9, 9, 9]), [5, 6, 7, 8]), [5, 6, 7, 8]) is None
    # First block matches, second differs, third matches a's third: only the first is reused.
    c = make_seq([1, 2, 3, 4, 0, 0, 0, 0, 9, 10, 11, 12, 0], 2)
    prefix = alloc.find_cached_prefix(c)
    assert prefix.num_tokens == 4 and prefix.blocks == [a.blocks[0]]


def test_prefix_caching_off_finds_and_registers_nothing():
    alloc = PagedKVAllocator(32, BS, enable_prefix_caching=False)
    a = make_seq(list(range(12)), 0)
    run_prefill(alloc, a)
    assert a.block_hashes == [] and alloc.pool.cached_hashes() == []
    assert alloc.find_cached_prefix(make_seq(list(range(12)) + [1], 1)).num_tokens == 0


def test_allocate_slots_gives_exact_blocks_and_grows_by_block():
    alloc = PagedKVAllocator(8, BS)
    seq = make_seq(list(range(6)))
    assert alloc.allocate_slots(seq, 6)
    assert seq.block_ids == [1, 2]
    assert [b.ref_cnt for b in seq.blocks] == [1, 1]
    seq.num_computed_tokens = 6
    seq.append_token(50)
    seq.append_token(51)
    assert alloc.allocate_slots(seq, 2)  # 8 tokens still fit in 2 blocks
    assert seq.block_ids == [1, 2]
    seq.num_computed_tokens = 8
    seq.append_token(52)
    assert alloc.allocate_slots(seq, 1)
    assert seq.block_ids == [1, 2, 3]
    assert alloc.num_free_blocks == 4
    assert alloc.usage == pytest.approx(3 / 7)


def test_allocate_slots_returns_false_and_changes_nothing_when_full():
    alloc = PagedKVAllocator(5, BS)  # 4 usable blocks
    other = make_seq(list(range(8)), 0)
    assert alloc.allocate_slots(other, 8)  # blocks 1, 2
    seq = make_seq(list(range(100, 112)), 1)  # needs 3 blocks, 2 free
    free_before = alloc.pool.free_block_ids()
    assert not alloc.allocate_slots(seq, 12)
    assert seq.blocks == [] and seq.block_hashes == []
    assert alloc.pool.free_block_ids() == free_before
    assert alloc.stats.queried_tokens == 0 and alloc.stats.hit_tokens == 0
    assert alloc.allocate_slots(seq, 8)  # what fits does fit
    assert seq.block_ids == [3, 4]


def test_allocate_slots_counts_idle_reused_blocks_against_the_free_pool():
    alloc = PagedKVAllocator(6, BS)  # 5 usable blocks
    a = make_seq(list(range(12)), 0)
    run_prefill(alloc, a)
    a_blocks = list(a.blocks)
    alloc.free(a)  # 3 cached idle blocks stay in the free list
    assert alloc.num_free_blocks == 5
    assert [b.ref_cnt for b in a_blocks] == [0, 0, 0]

    # 24 tokens: 3 reused (idle, so they count against the free pool) + 3 new = 6 > 5.
    too_big = make_seq(list(range(12)) + [1] * 12, 1)
    prefix = alloc.find_cached_prefix(too_big)
    assert prefix.blocks == a_blocks
    free_before = alloc.pool.free_block_ids()
    assert not alloc.allocate_slots(too_big, too_big.num_tokens - prefix.num_tokens, prefix)
    assert too_big.blocks == [] and alloc.pool.free_block_ids() == free_before
    assert [b.ref_cnt for b in a_blocks] == [0, 0, 0]
    assert all(b.block_hash is not None for b in a_blocks)

    # 20 tokens: 3 reused + 2 new = 5: fits exactly, and the cached blocks are not evicted for the new ones.
    fits = make_seq(list(range(12)) + [1] * 8, 2)
    prefix = alloc.find_cached_prefix(fits)
    assert alloc.allocate_slots(fits, fits.num_tokens - prefix.num_tokens, prefix)
    assert fits.blocks[:3] == a_blocks
    assert [b.ref_cnt for b in a_blocks] == [1, 1, 1]
    assert sorted(fits.block_ids[3:]) == [4, 5]
    assert alloc.num_free_blocks == 0
    assert fits.block_hashes == prefix.hashes


def test_shared_prefix_blocks_are_reference_counted():
    alloc = PagedKVAllocator(16, BS)
    a = make_seq(list(range(9)), 0)
    run_prefill(alloc, a)
    b = make_seq(list(range(9)), 1)
    run_prefill(alloc, b)
    assert b.blocks[:2] == a.blocks[:2]
    assert b.blocks[2] is not a.blocks[2]
    assert [blk.ref_cnt for blk in a.blocks] == [2, 2, 1]
    alloc.free(a)
    assert [blk.ref_cnt for blk in b.blocks] == [1, 1, 1]
    assert alloc.num_free_blocks == 15 - 3
    alloc.free(b)
    assert alloc.num_free_blocks == 15


def test_cache_full_blocks_registers_exactly_the_full_computed_blocks():
    alloc = PagedKVAllocator(16, BS)
    tokens = list(range(30, 40))  # 10 tokens: 2 full blocks + 2
    seq = make_seq(tokens)
    assert alloc.allocate_slots(seq, 10)
    seq.num_computed_tokens = 3
    alloc.cache_full_blocks(seq)
    assert seq.block_hashes == [] and alloc.pool.cached_hashes() == []
    seq.num_computed_tokens = 6  # a chunk: only the first block is full of computed tokens
    alloc.cache_full_blocks(seq)
    expected = list(iter_block_hashes(tokens, BS))
    assert seq.block_hashes == expected[:1]
    assert seq.blocks[0].block_hash == expected[0] and seq.blocks[0].token_ids == tuple(tokens[:4])
    assert seq.blocks[1].block_hash is None
    seq.num_computed_tokens = 10
    alloc.cache_full_blocks(seq)
    assert seq.block_hashes == expected
    assert seq.blocks[1].block_hash == expected[1]
    assert seq.blocks[2].block_hash is None  # the partial tail block is never registered
    assert sorted(alloc.pool.cached_hashes()) == sorted(expected)
    alloc.cache_full_blocks(seq)  # idempotent
    assert seq.block_hashes == expected


def test_free_returns_every_block_tail_first():
    alloc = PagedKVAllocator(8, BS)
    seq = make_seq(list(range(12)))
    run_prefill(alloc, seq)
    assert seq.block_ids == [1, 2, 3]
    alloc.free(seq)
    assert seq.blocks == [] and seq.block_hashes == []
    assert alloc.num_free_blocks == 7 and alloc.usage == 0.0
    # Tail first: the head block of the prompt is evicted last.
    assert alloc.pool.free_block_ids() == [4, 5, 6, 7, 3, 2, 1]


def test_hit_rate_counts_queried_and_hit_tokens():
    alloc = PagedKVAllocator(16, BS)
    assert alloc.stats.hit_rate == 0.0
    a = make_seq(list(range(8)), 0)
    run_prefill(alloc, a)
    assert (alloc.stats.queried_tokens, alloc.stats.hit_tokens) == (8, 0)
    b = make_seq(list(range(8)) + [1, 2, 3, 4], 1)
    run_prefill(alloc, b)
    assert (alloc.stats.queried_tokens, alloc.stats.hit_tokens) == (20, 8)
    assert alloc.stats.hit_rate == pytest.approx(8 / 20)
    assert b.blocks[:2] == a.blocks
