"""The paged KV allocator that every sequence of one engine shares.

It turns "this sequence needs room for n more tokens" into block ids, finds
the longest cached prefix of a new sequence, and registers blocks as they
fill so later requests can reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_cache.block_pool import BlockPool, KVBlock
from engine.kv_cache.block_table import BlockTable
from engine.kv_cache.hashing import ROOT_HASH, hash_block
from engine.sequence import Sequence


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass
class CachedPrefix:
    """Blocks holding the longest cached prefix of a sequence (not yet referenced)."""

    blocks: list[KVBlock]
    hashes: list[int]
    num_tokens: int


class PagedKVAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        # Block ids of every sequence holding blocks, one row each, for the runner's batch tables.
        self.block_table = BlockTable()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_usable_blocks * self.block_size

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by some sequence."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_usable_blocks

    def find_cached_prefix(self, seq: Sequence) -> CachedPrefix:
        """Longest run of cached full blocks at the start of `seq`.

        Capped so at least one token is left to compute: its logits are needed.
        """
        bs = self.block_size
        blocks: list[KVBlock] = []
        hashes: list[int] = []
        if self.enable_prefix_caching:
            parent = ROOT_HASH
            for i in range((seq.num_tokens - 1) // bs):
                tokens = seq.token_ids[i * bs : (i + 1) * bs]
                parent = hash_block(parent, tokens)
                block = self.pool.lookup(parent, tokens)
                if block is None:
                    break
                blocks.append(block)
                hashes.append(parent)
        return CachedPrefix(blocks, hashes, len(blocks) * bs)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix | None = None) -> bool:
        """Gives `seq` room for `num_new_tokens` more tokens; False (nothing changed) if the pool is too small."""
        total = seq.num_computed_tokens + num_new_tokens
        if prefix is None:
            # The common case, a decode whose last block still has room: nothing to do.
            need = -(-total // self.block_size) - len(seq.blocks)
            if need <= 0:
                return True
            reused = []
        else:
            reused = prefix.blocks
            total += prefix.num_tokens
            need = -(-total // self.block_size) - len(seq.blocks) - len(reused)
        idle_reused = sum(1 for b in reused if b.ref_cnt == 0)
        if need + idle_reused > self.pool.num_free_blocks:
            return False
        start = len(seq.blocks)
        for block in reused:
            self.pool.touch(block)
        seq.blocks.extend(reused)
        if prefix:
            seq.block_hashes.extend(prefix.hashes)
            self.stats.queried_tokens += seq.num_tokens
            self.stats.hit_tokens += prefix.num_tokens
        for _ in range(max(need, 0)):
            block = self.pool.allocate()
            assert block is not None  # counted above
            seq.blocks.append(block)
        self._write_table(seq, start)
        return True

    def _write_table(self, seq: Sequence, start: int) -> None:
        """Copies the block ids of seq.blocks[start:] into its row of the block table."""
        if len(seq.blocks) == start:
            return
        if seq.table_row is None:
            seq.table_row = self.block_table.assign_row()
        self.block_table.write(seq.table_row, start, [b.block_id for b in seq.blocks[start:]])

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers every block of `seq` that is now full of computed tokens.

        Only tokens the host knows count: with async scheduling a block whose last token is
        still on the device waits until the engine reads that token back and calls again.
        """
        bs = self.block_size
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        if num_full <= len(seq.block_hashes) or not self.enable_prefix_caching:
            return  # most steps: no block filled up
        parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
        for i in range(len(seq.block_hashes), num_full):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            parent = hash_block(parent, tokens)
            seq.block_hashes.append(parent)
            self.pool.register(seq.blocks[i], parent, tokens)

    def free(self, seq: Sequence) -> None:
        """Returns every block of `seq`, tail first, so a prompt's shared head stays cached longest."""
        for block in reversed(seq.blocks):
            self.pool.release(block)
        if seq.table_row is not None:
            self.block_table.release_row(seq.table_row, len(seq.blocks))
            seq.table_row = None
        seq.blocks = []
        seq.block_hashes = []
