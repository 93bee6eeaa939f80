"""Prefix-aware request routing for the LLM deployment (a Ray Serve custom request router).

For each request: hash the prompt's full blocks exactly as the replicas'
KV allocators do, ask the prefix index how long a leading run of those
blocks each replica holds, and prefer the replica with the longest run,
unless it has `imbalance_threshold` more ongoing requests than the idlest
candidate. With nothing cached, or the index slow or gone, it is plain power
of two choices. Serve then probes the preferred replicas' queues and falls
back to the next rank when they are full.

The router runs in the caller's (the ingress's) event loop: every Ray call is
awaited with a deadline, the only blocking call (looking an actor up by name)
runs in a thread, and hashing a prompt is a few microseconds per block.

A route is also remembered locally for a few seconds, so a burst of requests
sharing a new prefix follows the first one before its replica has published.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from deployments.messages import GenerateRequest
from engine.kv_cache.hashing import iter_block_hashes

logger = logging.getLogger("ray.serve")

IndexAddress = tuple[str, str]  # (actor name, namespace)


def prefer_cached(
    candidates: Sequence[str], cached_blocks: dict[str, int], loads: dict[str, int], imbalance_threshold: int
) -> list[str]:
    """The candidates to try first: the longest cached prefix among those not overloaded.

    Empty when no candidate worth preferring holds any block of the prompt.
    """
    if not candidates:
        return []
    least_load = min(loads.get(c, 0) for c in candidates)
    eligible = [c for c in candidates if loads.get(c, 0) - least_load <= imbalance_threshold]
    best = max((cached_blocks.get(c, 0) for c in eligible), default=0)
    if best == 0:
        return []
    return [c for c in eligible if cached_blocks.get(c, 0) == best]


class RecentRoutes:
    """Block hashes this router sent to each replica lately: a guess of what it is caching now."""

    def __init__(self, ttl_s: float = 10.0, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._expiry: OrderedDict[tuple[str, int], float] = OrderedDict()

    def add(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        expires = self._clock() + self._ttl_s
        for h in block_hashes:
            key = (replica_id, h)
            self._expiry[key] = expires
            self._expiry.move_to_end(key)
        while len(self._expiry) > self._max_entries:
            self._expiry.popitem(last=False)

    def match(self, block_hashes: Sequence[int], replica_ids: Sequence[str]) -> dict[str, int]:
        now = self._clock()
        out: dict[str, int] = {}
        for r in replica_ids:
            n = 0
            for h in block_hashes:
                expires = self._expiry.get((r, h))
                if expires is None or expires < now:
                    break
                n += 1
            out[r] = n
        return out


def generate_request(pending_request: PendingRequest) -> GenerateRequest | None:
    """The request of a call to the LLM deployment (the first one, for a batch of prompts)."""
    for arg in pending_request.args:
        if isinstance(arg, list) and arg and isinstance(arg[0], GenerateRequest):
            arg = arg[0]
        if isinstance(arg, GenerateRequest):
            return arg
    return None


def prompt_token_ids(pending_request: PendingRequest) -> list[int] | None:
    """The prompt of a call to the LLM deployment (the first one, for a batch of prompts)."""
    request = generate_request(pending_request)
    return None if request is None else request.prompt_token_ids


def stamp_router_time(pending_request: PendingRequest | None, now_unix_s: float) -> None:
    """Marks when the router first took the request up. Serve may call choose_replicas again for the
    same request (retries, backoff) or for the head of its queue on behalf of another, so this
    is the first time a routing attempt ran for it, to within one routing round."""
    request = None if pending_request is None else generate_request(pending_request)
    if request is not None and request.router_unix_s is None:
        request.router_unix_s = now_unix_s


def stamp_accepted_time(pending_request: PendingRequest, now_unix_s: float) -> None:
    """Marks when the replica's acceptance reached the ingress (Serve calls on_request_routed then)."""
    request = generate_request(pending_request)
    if request is not None:
        request.accepted_unix_s = now_unix_s


class PrefixAwareRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(
        self,
        block_size: int = 16,
        imbalance_threshold: int = 8,
        index_timeout_s: float = 0.05,
        recent_routes_ttl_s: float = 10.0,
    ) -> None:
        self._block_size = block_size
        self._imbalance_threshold = imbalance_threshold
        self._index_timeout_s = index_timeout_s
        self._recent = RecentRoutes(ttl_s=recent_routes_ttl_s)
        self._indexes: dict[IndexAddress, ActorHandle] = {}
        self._lookups: dict[IndexAddress, asyncio.Task] = {}
        # Hashes computed while choosing, kept until the request is routed (bounded).
        self._pending_hashes: OrderedDict[str, list[int]] = OrderedDict()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        stamp_router_time(pending_request, time.time())
        fallback = self._power_of_two(pending_request)
        if pending_request is None or len(candidate_replicas) < 2 or not fallback:
            return fallback
        token_ids = prompt_token_ids(pending_request)
        if not token_ids:
            return fallback
        hashes = list(iter_block_hashes(token_ids, self._block_size))
        if not hashes:
            return fallback
        self._remember_hashes(pending_request, hashes)
        by_id = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
        ids = list(by_id)
        indexed = await self._index_match(hashes, candidate_replicas)
        recent = self._recent.match(hashes, ids)
        cached = {r: max(indexed.get(r, (0, 0))[0], recent[r]) for r in ids}
        loads = {r: self._load(by_id[r], indexed.get(r, (0, 0))[1]) for r in ids}
        preferred = prefer_cached(ids, cached, loads, self._imbalance_threshold)
        if not preferred:
            return fallback
        return [[by_id[r] for r in preferred], *fallback]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        stamp_accepted_time(pending_request, time.time())
        hashes = self._pending_hashes.pop(pending_request.metadata.internal_request_id, None)
        if hashes:
            self._recent.add(replica_id.to_full_id_str(), hashes)

    # ----- helpers ------------------------------------------------------------------------

    def _power_of_two(self, pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        """Two random replicas (Serve sends to the shorter queue), same node first, as Serve's default."""
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = list(self.apply_multiplex_routing(pending_request=pending_request))
        else:
            ids = list(self.apply_locality_routing(pending_request=pending_request))
        if not ids:
            return []
        chosen = (self.curr_replicas.get(i) for i in random.sample(ids, k=min(2, len(ids))))
        return [[r for r in chosen if r is not None]]

    def _remember_hashes(self, pending_request: PendingRequest, hashes: list[int]) -> None:
        self._pending_hashes[pending_request.metadata.internal_request_id] = hashes
        while len(self._pending_hashes) > 10_000:  # requests cancelled before routing never pop theirs
            self._pending_hashes.popitem(last=False)

    def _load(self, replica: RunningReplica, published: int) -> int:
        """Ongoing requests: the router's own fresh probe when it has one, else what the replica published."""
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        return queue_len if queue_len is not None else published

    async def _index_match(self, hashes: list[int], replicas: list[RunningReplica]) -> dict[str, tuple[int, int]]:
        """(cached blocks, load) per replica, from each replica's prefix index; {} when unknown."""
        groups: dict[IndexAddress, list[str]] = {}
        for r in replicas:
            address = r.replica_metadata.get("prefix_index")
            if address:
                groups.setdefault((address[0], address[1]), []).append(r.replica_id.to_full_id_str())
        results: dict[str, tuple[int, int]] = {}
        # Usually one index; two while a new code version rolls out.
        for address, ids in groups.items():
            results.update(await self._query(address, hashes, ids))
        return results

    async def _query(self, address: IndexAddress, hashes: list[int], ids: list[str]) -> dict[str, tuple[int, int]]:
        try:
            index = await self._index_handle(address)
            if index is None:
                return {}
            ref = index.match.remote(hashes, ids)
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self._index_timeout_s)
        except asyncio.TimeoutError:
            return {}
        except Exception as exc:  # the index died or is being recreated: look it up again next time
            logger.warning("prefix index %s unavailable: %r", address[0], exc)
            self._indexes.pop(address, None)
            return {}

    async def _index_handle(self, address: IndexAddress) -> ActorHandle | None:
        if address in self._indexes:
            return self._indexes[address]
        task = self._lookups.get(address)
        if task is None or task.done() and task.exception() is not None:
            # ray.get_actor blocks on the GCS: keep it off the event loop.
            task = self._lookups[address] = asyncio.get_running_loop().create_task(
                asyncio.to_thread(ray.get_actor, address[0], namespace=address[1])
            )
        try:
            handle = await asyncio.wait_for(asyncio.shield(task), self._index_timeout_s)
        except asyncio.TimeoutError:
            return None
        self._indexes[address] = handle
        self._lookups.pop(address, None)
        return handle
