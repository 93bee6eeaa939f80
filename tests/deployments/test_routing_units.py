"""The prefix index and the router's policy, without Ray."""

from __future__ import annotations

from types import SimpleNamespace

from deployments.messages import GenerateRequest
from deployments.prefix_index import PrefixIndexState
from deployments.router import RecentRoutes, prefer_cached, prompt_token_ids
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.hash_log import CacheChanges
from engine.kv_cache.hashing import iter_block_hashes
from engine.sampling_params import SamplingParams


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def hashes(tokens: list[int], block_size: int = 4) -> list[int]:
    return list(iter_block_hashes(tokens, block_size))


PROMPT = list(range(100, 116))  # 4 blocks of 4
H = hashes(PROMPT)


def test_match_counts_the_leading_run_per_replica() -> None:
    index = PrefixIndexState()
    index.update("a", H[:3], [], reset=True, load=1, stats={})
    index.update("b", H[:1] + H[2:], [], reset=True, load=0, stats={})  # a gap after the first block
    index.update("c", [], [], reset=True, load=5, stats={})
    assert index.match(H, ["a", "b", "c", "unknown"]) == {"a": (3, 1), "b": (1, 0), "c": (0, 5)}


def test_diffs_reset_and_forget() -> None:
    index = PrefixIndexState()
    index.update("a", H, [], reset=True, load=0, stats={})
    index.update("a", [], H[2:], reset=False, load=0, stats={})  # evicted the tail
    assert index.match(H, ["a"]) == {"a": (2, 0)}
    index.update("a", H[:1], [], reset=True, load=0, stats={})  # full resend replaces everything
    assert index.match(H, ["a"]) == {"a": (1, 0)}
    index.forget("a")
    assert index.match(H, ["a"]) == {}
    assert index.stats() == {}


def test_silent_replicas_expire_and_stats_are_kept() -> None:
    clock = Clock()
    index = PrefixIndexState(stale_after_s=10, clock=clock)
    token = index.update("a", H, [], reset=True, load=2, stats={"kv_cache_usage": 0.5})
    assert token == index.token
    assert index.stats() == {"a": {"kv_cache_usage": 0.5, "ongoing_requests": 2, "cached_blocks": 4}}
    clock.now = 11
    assert index.match(H, ["a"]) == {} and index.stats() == {}


def test_prefer_cached_longest_prefix_unless_overloaded() -> None:
    ids = ["a", "b", "c"]
    assert prefer_cached(ids, {"a": 2, "b": 4}, {"a": 0, "b": 3, "c": 0}, imbalance_threshold=8) == ["b"]
    # b holds more, but is far busier than the idlest replica: take the best of the rest.
    assert prefer_cached(ids, {"a": 2, "b": 4}, {"a": 0, "b": 9, "c": 0}, imbalance_threshold=8) == ["a"]
    # Nothing cached anywhere worth it: no preference (power of two choices decides).
    assert prefer_cached(ids, {"b": 4}, {"a": 0, "b": 9, "c": 0}, imbalance_threshold=8) == []
    assert prefer_cached(ids, {}, {}, imbalance_threshold=8) == []
    # Ties are all returned; Serve picks the shorter queue among them.
    assert prefer_cached(ids, {"a": 3, "c": 3}, {}, imbalance_threshold=0) == ["a", "c"]


def test_recent_routes_expire() -> None:
    clock = Clock()
    recent = RecentRoutes(ttl_s=5, clock=clock)
    recent.add("a", H[:2])
    assert recent.match(H, ["a", "b"]) == {"a": 2, "b": 0}
    clock.now = 6
    assert recent.match(H, ["a"]) == {"a": 0}


def test_recent_routes_are_bounded() -> None:
    recent = RecentRoutes(max_entries=3)
    recent.add("a", H)  # 4 entries: the oldest (the first block) goes
    assert recent.match(H, ["a"]) == {"a": 0}
    assert recent.match(H[1:], ["a"]) == {"a": 3}


def test_router_reads_the_prompt_from_the_call() -> None:
    req = GenerateRequest("r", [1, 2, 3], SamplingParams())
    other = GenerateRequest("s", [9], SamplingParams())
    assert prompt_token_ids(SimpleNamespace(args=[req], kwargs={})) == [1, 2, 3]
    assert prompt_token_ids(SimpleNamespace(args=[[req, other]], kwargs={})) == [1, 2, 3]
    assert prompt_token_ids(SimpleNamespace(args=["other"], kwargs={})) is None


def test_router_stamps_the_first_time_it_takes_a_request_up() -> None:
    from deployments.router import stamp_router_time

    req = GenerateRequest("r", [1, 2, 3], SamplingParams())
    call = SimpleNamespace(args=[req], kwargs={})
    stamp_router_time(call, 100.5)
    stamp_router_time(call, 101.0)  # a retry keeps the first
    assert req.router_unix_s == 100.5
    stamp_router_time(None, 1.0)  # Serve's probes come without a request
    stamp_router_time(SimpleNamespace(args=["other"], kwargs={}), 1.0)


def test_router_stamps_the_replicas_acceptance_on_the_ingress_side() -> None:
    from deployments.router import stamp_accepted_time

    req = GenerateRequest("r", [1, 2, 3], SamplingParams())
    stamp_accepted_time(SimpleNamespace(args=[[req]], kwargs={}), 100.5)  # a batch: its first request
    assert req.accepted_unix_s == 100.5 and req.router_unix_s is None
    stamp_accepted_time(SimpleNamespace(args=["other"], kwargs={}), 1.0)  # not ours: nothing to stamp


class FakeIndex:
    """Stands in for the PrefixIndex actor handle: `update.remote(...)` is awaitable."""

    def __init__(self) -> None:
        self.state = PrefixIndexState()
        self.calls: list[tuple[list[int], list[int], bool]] = []
        self.update = SimpleNamespace(remote=self._update)

    async def _update(self, replica_id, added, removed, *, reset, load, stats):
        self.calls.append((sorted(added), sorted(removed), reset))
        return self.state.update(replica_id, added, removed, reset=reset, load=load, stats=stats)


def _cache(pool: BlockPool, hashes: list[int]) -> None:
    """Makes `pool` cache exactly `hashes` (one block each), evicting the others."""
    for h in sorted(set(pool.cached_hashes()) - set(hashes)):
        block = next(b for b in pool.blocks if b.block_hash == h)
        pool.release(block)
        while block.block_hash is not None:  # take blocks off the free list's head until it is evicted
            pool.release(pool.allocate())
    for h in hashes:
        if h not in pool.cached_hashes():
            pool.register(pool.allocate(), h, [h])


def _publisher(index, pool: BlockPool, resolve_index=None):
    from deployments.config import RouterOptions
    from deployments.llm_server import CachePublisher

    async def cache_changes(full: bool) -> CacheChanges:
        return pool.cached_hash_changes(full)

    return CachePublisher(
        "r", index, resolve_index=resolve_index or (lambda: index), cache_changes=cache_changes,
        stats=lambda: {"num_running": 1, "num_waiting": 0}, load=lambda: 1,
        options=RouterOptions(publish_interval_s=0.01),
    )


def test_publisher_sends_diffs_and_resends_all_after_an_index_restart() -> None:
    import asyncio

    pool = BlockPool(64)
    index = FakeIndex()
    publisher = _publisher(index, pool)

    async def run() -> None:
        _cache(pool, [1, 2, 3])
        await publisher.publish({})
        _cache(pool, [2, 3, 4])
        await publisher.publish({})
        index.state = PrefixIndexState()  # the index restarted: a new token
        _cache(pool, [2, 3, 4, 5])
        await publisher.publish({})  # a diff the new index cannot apply...
        await publisher.publish({})  # ...so the next publish resends everything

    asyncio.run(run())
    assert index.calls == [([1, 2, 3], [], True), ([4], [1], False), ([5], [], False), ([2, 3, 4, 5], [], True)]
    assert index.state.match([2, 3, 4, 5], ["r"]) == {"r": (4, 1)}


def test_publisher_finds_a_replaced_index_and_resends_everything() -> None:
    import asyncio

    pool = BlockPool(64)
    dead, fresh = FakeIndex(), FakeIndex()

    async def gone(*args, **kwargs):
        raise RuntimeError("actor died")

    publisher = _publisher(dead, pool, resolve_index=lambda: fresh)

    async def run() -> None:
        _cache(pool, [1, 2])
        await publisher.publish({})
        dead.update = SimpleNamespace(remote=gone)
        _cache(pool, [2, 3])
        publisher.start()
        for _ in range(500):  # 5 s at most
            if fresh.calls:
                break
            await asyncio.sleep(0.01)
        publisher.stop()

    asyncio.run(run())
    assert dead.calls == [([1, 2], [], True)]
    assert fresh.calls[0] == ([2, 3], [], True)
    assert fresh.state.match([2, 3], ["r"]) == {"r": (2, 1)}
