"""Chain hashes of full KV blocks: a block's hash covers its tokens and every block before it.

Python's hash of a tuple of ints is the same in every process (PYTHONHASHSEED
only salts str and bytes), so the router computes the same hashes from a
prompt as the replicas do from their caches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

ROOT_HASH = 0x5EED  # the parent of every sequence's first block


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    return hash((parent_hash, tuple(token_ids)))


def iter_block_hashes(token_ids: Sequence[int], block_size: int, start_hash: int = ROOT_HASH) -> Iterator[int]:
    """Chain hashes of the full blocks of `token_ids`, in order."""
    parent = start_hash
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        yield parent
