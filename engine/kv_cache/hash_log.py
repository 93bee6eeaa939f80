"""What changed in the prefix cache's set of hashes since someone last asked: the router's feed.

Each LLM replica tells the prefix index which block hashes its cache holds. Sending the
whole set each round made the replica build and diff a set of every cached hash ten times
a second (up to one per KV block: 16k on a GPU) on its event loop, the loop that also
admits every request: a tenth of that loop's time under load (BENCHMARKS.md, W2). The
pool records each hash it starts or stops caching here instead, so a round costs what
changed since the last one.

One reader. The log holds net changes only (a hash cached and evicted again between two
reads is no change), and is bounded: past `limit` entries it forgets them and the next
read is a full snapshot (`CacheChanges.full`), which the reader applies as a reset.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CacheChanges:
    """Hashes cached and evicted since the last read; with `full`, `added` is the whole set."""

    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    full: bool = False


class CachedHashLog:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        # hash -> cached now? Only hashes whose state differs from what the reader last got.
        self._changes: dict[int, bool] = {}
        self._overflowed = True  # the reader has got nothing yet: its first read is a snapshot
        # The pool may change on an engine thread while the reader's loop reads (AsyncLLMEngine).
        self._lock = threading.Lock()

    def cached(self, block_hash: int) -> None:
        with self._lock:
            if self._changes.pop(block_hash, True):  # evicted since the last read: the reader still has it
                self._changes[block_hash] = True
                self._bound()

    def evicted(self, block_hash: int) -> None:
        with self._lock:
            if not self._changes.pop(block_hash, False):  # cached since the last read: the reader never had it
                self._changes[block_hash] = False
                self._bound()

    def take(self, snapshot: Callable[[], Iterable[int]], full: bool = False) -> CacheChanges:
        """The changes since the last take, then forgotten; the whole set (`snapshot()`) instead when
        asked (`full`: the reader lost its view) or when the log overflowed."""
        with self._lock:
            if full or self._overflowed:
                self._changes.clear()
                self._overflowed = False
                return CacheChanges(added=list(snapshot()), full=True)
            changes, self._changes = self._changes, {}
        return CacheChanges(
            added=[h for h, now in changes.items() if now], removed=[h for h, now in changes.items() if not now]
        )

    def _bound(self) -> None:
        if len(self._changes) > self._limit:
            self._changes.clear()
            self._overflowed = True
