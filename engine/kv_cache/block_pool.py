"""Fixed-size KV blocks with reference counts; the free list doubles as the LRU eviction order.

A block whose last user leaves keeps its contents and its hash: it sits in the
free list, reusable by a later request with the same prefix, until it reaches
the head of the list and is taken for new tokens (evicted). Block 0 is never
handed out: padded batch rows write their dummy K/V there.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from engine.kv_cache.hash_log import CachedHashLog, CacheChanges

NULL_BLOCK_ID = 0


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept to rule out hash collisions on a hit


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Head = evicted first. Insertion order is the order blocks became free.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[int, KVBlock] = {}
        # Twice the pool: room for every hash it can hold plus as many evictions before a snapshot.
        self._log = CachedHashLog(limit=2 * num_blocks)

    @property
    def num_usable_blocks(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def free_block_ids(self) -> list[int]:
        """The free list in eviction order (for tests and metrics)."""
        return list(self._free)

    def allocate(self) -> KVBlock | None:
        """The least recently freed block, emptied; None when every block is in use."""
        if not self._free:
            return None
        _, block = self._free.popitem(last=False)
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
                self._log.evicted(block.block_hash)
            block.block_hash = None
            block.token_ids = None
        block.ref_cnt = 1
        return block

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> KVBlock | None:
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def touch(self, block: KVBlock) -> None:
        """Takes a reference to a cached block, pulling it off the free list if it was idle."""
        if block.ref_cnt == 0:
            del self._free[block.block_id]
        block.ref_cnt += 1

    def release(self, block: KVBlock) -> None:
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self._free[block.block_id] = block

    def register(self, block: KVBlock, block_hash: int, token_ids: Sequence[int]) -> None:
        """Marks a full block reusable under `block_hash` (first writer wins on duplicates)."""
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        if self._cached.setdefault(block_hash, block) is block:
            self._log.cached(block_hash)

    def cached_hashes(self) -> list[int]:
        return list(self._cached)

    def cached_hash_changes(self, full: bool = False) -> CacheChanges:
        """Hashes cached and evicted since the last call (its only caller: the router's feed);
        everything cached now on the first call, with `full`, or after too many changes."""
        return self._log.take(self.cached_hashes, full)
