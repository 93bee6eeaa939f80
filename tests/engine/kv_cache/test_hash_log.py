"""CachedHashLog and BlockPool.cached_hash_changes: the net changes the router's feed reads."""

from __future__ import annotations

from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.hash_log import CachedHashLog, CacheChanges


def snapshot(*hashes: int):
    return lambda: list(hashes)


def test_first_read_is_the_whole_set_then_only_what_changed():
    log = CachedHashLog(limit=100)
    log.cached(1)
    assert log.take(snapshot(1, 2)) == CacheChanges(added=[1, 2], full=True)
    log.cached(3)
    log.evicted(2)
    assert log.take(snapshot(1, 3)) == CacheChanges(added=[3], removed=[2])
    assert log.take(snapshot(1, 3)) == CacheChanges()


def test_a_hash_that_comes_and_goes_between_reads_is_no_change():
    log = CachedHashLog(limit=100)
    log.take(snapshot(7))  # the reader has {7}
    log.cached(8)
    log.evicted(8)  # never seen by the reader
    log.evicted(7)
    log.cached(7)  # the reader still has it
    assert log.take(snapshot(7)) == CacheChanges()


def test_overflow_or_a_reader_that_lost_its_view_gets_a_snapshot():
    log = CachedHashLog(limit=3)
    log.take(snapshot())
    for h in range(4):
        log.cached(h)
    assert log.take(snapshot(0, 1, 2, 3)) == CacheChanges(added=[0, 1, 2, 3], full=True)
    log.cached(9)
    assert log.take(snapshot(0, 1, 2, 3, 9), full=True) == CacheChanges(added=[0, 1, 2, 3, 9], full=True)
    assert log.take(snapshot(0, 1, 2, 3, 9)) == CacheChanges()


def test_block_pool_logs_registration_and_eviction():
    pool = BlockPool(4)
    assert pool.cached_hash_changes() == CacheChanges(full=True)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.register(a, 111, [1, 2])
    pool.register(b, 222, [3, 4])
    pool.register(c, 111, [1, 2])  # a duplicate: first writer wins, nothing new is cached
    assert sorted(pool.cached_hash_changes().added) == [111, 222]
    pool.release(c)
    pool.release(a)
    assert pool.allocate() is c  # the loser's eviction leaves 111 cached (a holds it)
    assert pool.cached_hash_changes() == CacheChanges()
    assert pool.allocate() is a  # now 111 is gone
    assert pool.cached_hash_changes() == CacheChanges(removed=[111])
    assert pool.cached_hash_changes(full=True) == CacheChanges(added=[222], full=True)
