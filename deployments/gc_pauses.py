"""How long Python's cyclic garbage collector stops a replica's process: the event loop with it.

A replica does all its work on one event loop (admitting requests, every stream chunk); while a
collection runs nothing else in the process does. A full collection walks every object the process
holds (some 250k in a process that imports Ray, Serve and torch: 139 ms on this repo's 2-CPU
machine), so whether they come often under load is worth seeing rather than guessing. `GcPauses`
times each collection (gc.callbacks) per generation; /metrics shows the totals of each replica.

Measured under W2's load on the 2-CPU machine (64 streams, about 30 s a pass): the LLM replica spent
135-148 ms in collections a pass (0.5% of the time), 2-3 of them full at 1-5 ms each; moving
everything alive after start out of the collector's reach (gc.freeze) changed neither that nor
the throughput (two passes each way), so the replicas do not freeze.
The engine core does, after loading its model (engine/core_process.py).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

GENERATIONS = (0, 1, 2)


@dataclass(frozen=True)
class GcTotals:
    seconds: tuple[float, ...]  # per generation, summed over its collections
    collections: tuple[int, ...]


class GcPauses:
    """Adds up how long this process's garbage collections took, per generation, while started."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._seconds = [0.0] * len(GENERATIONS)
        self._collections = [0] * len(GENERATIONS)
        self._started_at: float | None = None
        self._registered = False

    def start(self) -> None:
        """Times collections from now on (once; gc.callbacks is the process's own list)."""
        if not self._registered:
            gc.callbacks.append(self._on_collection)
            self._registered = True

    def stop(self) -> None:
        if self._registered:
            gc.callbacks.remove(self._on_collection)
            self._registered = False

    def totals(self) -> GcTotals:
        return GcTotals(tuple(self._seconds), tuple(self._collections))

    def stats(self) -> dict[str, float]:
        """The totals as a replica publishes them: every collection, and the full ones alone."""
        totals = self.totals()
        return {
            "gc_pause_s_total": sum(totals.seconds),
            "gc_collections_total": sum(totals.collections),
            "gc_full_pause_s_total": totals.seconds[-1],
            "gc_full_collections_total": totals.collections[-1],
        }

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started_at = self._clock()
        elif self._started_at is not None:
            generation = info["generation"]
            self._seconds[generation] += self._clock() - self._started_at
            self._collections[generation] += 1
            self._started_at = None
