"""The shared view of the replicas' paged KV caches: which replica holds which block hashes.

Each LLM replica publishes the chain hashes of the blocks its prefix cache
holds (as diffs), with its load and engine stats. The router asks, for a
prompt's block hashes, how long a leading run of them each replica holds;
the ingress reads the stats for /metrics.

The index is a Serve deployment-scoped actor of the LLM deployment, so Serve
creates it before the replicas, health-checks it and removes it with the app.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.serve._private.constants import SERVE_NAMESPACE


@dataclass
class ReplicaEntry:
    hashes: set[int] = field(default_factory=set)
    load: int = 0  # ongoing requests, as last published
    stats: dict[str, Any] = field(default_factory=dict)
    last_seen: float = 0.0


class PrefixIndexState:
    """The index itself, without Ray (unit-tested directly).

    `owners` maps a block hash to the replicas holding it, so a match walks the
    prompt's hashes once however many replicas there are.
    """

    def __init__(self, stale_after_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.token = uuid.uuid4().hex  # changes when the index restarts: replicas then resend everything
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._replicas: dict[str, ReplicaEntry] = {}
        self._owners: dict[int, set[str]] = {}

    def update(
        self,
        replica_id: str,
        added: Iterable[int],
        removed: Iterable[int],
        *,
        reset: bool,
        load: int,
        stats: dict[str, Any],
    ) -> str:
        """Applies one replica's diff (or full set when `reset`); returns this index's token."""
        entry = self._replicas.get(replica_id)
        if entry is None:
            entry = self._replicas[replica_id] = ReplicaEntry()
        if reset:
            self._drop_hashes(replica_id, entry.hashes)
            entry.hashes = set()
        else:
            removed = list(removed)
            self._drop_hashes(replica_id, removed)
            entry.hashes.difference_update(removed)
        for h in added:
            entry.hashes.add(h)
            self._owners.setdefault(h, set()).add(replica_id)
        entry.load, entry.stats, entry.last_seen = load, stats, self._clock()
        return self.token

    def forget(self, replica_id: str) -> None:
        entry = self._replicas.pop(replica_id, None)
        if entry is not None:
            self._drop_hashes(replica_id, entry.hashes)

    def match(self, block_hashes: Sequence[int], replica_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """For each known, live replica of `replica_ids`: (leading blocks it holds, its load)."""
        self._expire()
        live = [r for r in replica_ids if r in self._replicas]
        depth = dict.fromkeys(live, 0)
        active = set(live)
        for i, h in enumerate(block_hashes):
            if not active:
                break
            holders = self._owners.get(h)
            active = active & holders if holders else set()
            for r in active:
                depth[r] = i + 1
        return {r: (depth[r], self._replicas[r].load) for r in live}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per live replica: its published engine stats, load and cached block count."""
        self._expire()
        return {
            r: {**e.stats, "ongoing_requests": e.load, "cached_blocks": len(e.hashes)} for r, e in self._replicas.items()
        }

    def _drop_hashes(self, replica_id: str, hashes: Iterable[int]) -> None:
        for h in hashes:
            holders = self._owners.get(h)
            if holders is not None:
                holders.discard(replica_id)
                if not holders:
                    del self._owners[h]

    def _expire(self) -> None:
        # A replica that died without saying so stops heartbeating; forget it.
        cutoff = self._clock() - self._stale_after_s
        for r in [r for r, e in self._replicas.items() if e.last_seen < cutoff]:
            self.forget(r)


@ray.remote(num_cpus=0)
class PrefixIndex(PrefixIndexState):
    """The actor the LLM deployment declares in `deployment_actors`."""

    def address(self) -> tuple[str, str]:
        """(name, namespace): how processes outside the deployment (the router) find this actor."""
        # Serve creates deployment actors in its own namespace; the runtime context reports the
        # creating job's namespace instead, so it cannot be used here.
        return ray.get_runtime_context().get_actor_name(), SERVE_NAMESPACE
