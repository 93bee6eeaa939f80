"""BlockPool: exact block ids, reference counts, LRU eviction order, hash hits and eviction."""

from __future__ import annotations

from engine.kv_cache.block_pool import NULL_BLOCK_ID, BlockPool


def test_null_block_is_never_handed_out_and_ids_come_in_order():
    pool = BlockPool(5)
    assert pool.num_usable_blocks == 4
    assert pool.free_block_ids() == [1, 2, 3, 4]
    got = [pool.allocate() for _ in range(4)]
    assert [b.block_id for b in got] == [1, 2, 3, 4]
    assert all(b.ref_cnt == 1 for b in got)
    assert NULL_BLOCK_ID not in [b.block_id for b in got]
    assert pool.num_free_blocks == 0
    assert pool.allocate() is None


def test_release_returns_block_only_when_last_reference_goes():
    pool = BlockPool(4)
    block = pool.allocate()
    assert block.block_id == 1
    pool.touch(block)  # a second user
    assert block.ref_cnt == 2
    pool.release(block)
    assert block.ref_cnt == 1
    assert 1 not in pool.free_block_ids()
    assert pool.num_free_blocks == 2
    pool.release(block)
    assert block.ref_cnt == 0
    assert pool.free_block_ids() == [2, 3, 1]  # appended at the tail: evicted last


def test_free_list_is_lru_in_release_order():
    pool = BlockPool(6)
    blocks = {b.block_id: b for b in (pool.allocate() for _ in range(5))}
    for block_id in (3, 1, 5):
        pool.release(blocks[block_id])
    assert pool.free_block_ids() == [3, 1, 5]
    assert [pool.allocate().block_id for _ in range(3)] == [3, 1, 5]
    assert pool.allocate() is None


def test_lookup_needs_equal_hash_and_equal_tokens():
    pool = BlockPool(4)
    block = pool.allocate()
    pool.register(block, 1234, [7, 8, 9, 10])
    assert block.block_hash == 1234 and block.token_ids == (7, 8, 9, 10)
    assert pool.lookup(1234, [7, 8, 9, 10]) is block
    assert pool.lookup(1234, (7, 8, 9, 10)) is block
    # Same hash, other tokens: a collision must not be served as a hit.
    assert pool.lookup(1234, [7, 8, 9, 11]) is None
    assert pool.lookup(4321, [7, 8, 9, 10]) is None
    assert pool.cached_hashes() == [1234]


def test_idle_cached_block_is_reused_by_touch_and_leaves_the_free_list():
    pool = BlockPool(5)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 111, [1, 2])
    pool.release(a)
    pool.release(b)
    assert a.ref_cnt == 0
    assert pool.free_block_ids() == [3, 4, 1, 2]
    # Still cached while idle.
    hit = pool.lookup(111, [1, 2])
    assert hit is a
    pool.touch(hit)
    assert a.ref_cnt == 1
    assert pool.free_block_ids() == [3, 4, 2]
    assert pool.num_free_blocks == 3
    # Allocation never hands out the touched block.
    assert [pool.allocate().block_id for _ in range(3)] == [3, 4, 2]
    assert pool.allocate() is None
    assert a.block_hash == 111 and pool.lookup(111, [1, 2]) is a


def test_eviction_drops_the_hash():
    pool = BlockPool(3)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 111, [1, 2])
    pool.register(b, 222, [3, 4])
    pool.release(a)  # a is at the head of the free list: evicted first
    pool.release(b)
    assert sorted(pool.cached_hashes()) == [111, 222]
    evicted = pool.allocate()
    assert evicted is a
    assert evicted.block_hash is None and evicted.token_ids is None and evicted.ref_cnt == 1
    assert pool.lookup(111, [1, 2]) is None
    assert pool.cached_hashes() == [222]
    assert pool.lookup(222, [3, 4]) is b


def test_duplicate_registration_first_writer_wins_and_evicting_the_loser_keeps_the_winner():
    pool = BlockPool(4)
    first, second = pool.allocate(), pool.allocate()
    pool.register(first, 99, [5, 5])
    pool.register(second, 99, [5, 5])
    assert pool.lookup(99, [5, 5]) is first
    pool.release(second)
    assert pool.allocate() is not second  # block 3 was free before second
    assert pool.allocate() is second  # now second is evicted ...
    assert pool.lookup(99, [5, 5]) is first  # ... and the winner's entry survives
    assert pool.cached_hashes() == [99]
