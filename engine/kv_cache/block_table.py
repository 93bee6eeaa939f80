"""Every sequence's block ids as one row of a host array, kept up to date as blocks come and go.

The runner needs a padded [batch, width] table of block ids every step.
Building it from each sequence's list of blocks costs microseconds per
sequence per step; here the allocator writes a block id once, when it hands
the block out, and a step's table is a single numpy gather of the batch's
rows. Entries past a sequence's own blocks are 0 (the null block).
"""

from __future__ import annotations

import numpy as np


class BlockTable:
    def __init__(self, rows: int = 64, width: int = 64) -> None:
        self.ids = np.zeros((rows, width), dtype=np.int32)
        self._free_rows = list(range(rows - 1, -1, -1))  # popped from the end: row 0 first

    def assign_row(self) -> int:
        if not self._free_rows:
            self._grow(rows=2 * self.ids.shape[0])
        return self._free_rows.pop()

    def release_row(self, row: int, num_blocks: int) -> None:
        """Zeroes the row's first `num_blocks` entries (the rest already are) and frees it."""
        self.ids[row, :num_blocks] = 0
        self._free_rows.append(row)

    def write(self, row: int, start: int, block_ids: list[int]) -> None:
        end = start + len(block_ids)
        if end > self.ids.shape[1]:
            self._grow(width=max(end, 2 * self.ids.shape[1]))
        self.ids[row, start:end] = block_ids

    def gather(self, rows: np.ndarray, width: int) -> np.ndarray:
        """[len(rows), width] block ids of those rows (a copy)."""
        return self.ids[rows, :width]

    def _grow(self, rows: int | None = None, width: int | None = None) -> None:
        old_rows, old_width = self.ids.shape
        rows, width = rows or old_rows, width or old_width
        ids = np.zeros((rows, width), dtype=np.int32)
        ids[:old_rows, :old_width] = self.ids
        self.ids = ids
        self._free_rows[:0] = range(rows - 1, old_rows - 1, -1)  # new rows go after the old free ones
