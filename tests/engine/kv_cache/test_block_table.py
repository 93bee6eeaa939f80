"""BlockTable, and the allocator keeping each sequence's row equal to its block ids."""

from __future__ import annotations

import numpy as np

from engine.kv_cache.allocator import PagedKVAllocator
from engine.kv_cache.block_table import BlockTable
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 4


def make_seq(tokens: list[int], seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(tokens), SamplingParams(), 0.0)


def row_ids(alloc: PagedKVAllocator, seq: Sequence, width: int) -> list[int]:
    return alloc.block_table.gather(np.array([seq.table_row]), width)[0].tolist()


def test_rows_are_handed_out_in_order_and_reused_once_released():
    table = BlockTable(rows=2, width=2)
    assert [table.assign_row(), table.assign_row()] == [0, 1]
    assert table.assign_row() == 2  # grown: rows 2 and 3 added
    table.release_row(0, 0)
    assert table.assign_row() == 0
    assert table.assign_row() == 3


def test_write_grows_the_width_and_keeps_what_was_written():
    table = BlockTable(rows=2, width=2)
    row = table.assign_row()
    table.write(row, 0, [5, 6])
    table.write(row, 2, [7, 8, 9])
    assert table.gather(np.array([row, 1]), 5).tolist() == [[5, 6, 7, 8, 9], [0, 0, 0, 0, 0]]


def test_allocator_rows_follow_the_blocks_and_are_zeroed_on_free():
    alloc = PagedKVAllocator(16, BS)
    a, b = make_seq(list(range(6)), 0), make_seq(list(range(100, 103)), 1)
    assert alloc.allocate_slots(a, 6) and alloc.allocate_slots(b, 3)
    assert (a.table_row, b.table_row) == (0, 1)
    assert row_ids(alloc, a, 3) == a.block_ids + [0] == [1, 2, 0]
    assert row_ids(alloc, b, 3) == [3, 0, 0]
    a.num_computed_tokens = 6
    assert alloc.allocate_slots(a, 3)  # 9 tokens: a third block
    assert row_ids(alloc, a, 3) == a.block_ids == [1, 2, 4]
    alloc.free(a)
    assert a.table_row is None
    assert alloc.block_table.ids[0].tolist()[:3] == [0, 0, 0]
    c = make_seq(list(range(200, 205)), 2)
    assert alloc.allocate_slots(c, 5)
    assert c.table_row == 0 and row_ids(alloc, c, 3) == c.block_ids + [0]


def test_a_prefix_hit_writes_the_reused_blocks_first():
    alloc = PagedKVAllocator(16, BS)
    a = make_seq(list(range(10)), 0)
    assert alloc.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    alloc.cache_full_blocks(a)
    b = make_seq(list(range(10)) + [77, 78], 1)
    prefix = alloc.find_cached_prefix(b)
    assert prefix.num_tokens == 8
    assert alloc.allocate_slots(b, 4, prefix)
    assert row_ids(alloc, b, 3) == b.block_ids == a.block_ids[:2] + [b.block_ids[2]]
