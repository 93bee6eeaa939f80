"""Greedy tokens of a few rows in one kernel: the argmax of each row of logits.

Why. At batch 1 a decode step of the 8B model is a CUDA graph and then, outside it, a handful of
small operations; each costs the GPU a few microseconds of its own plus the gap before the next.
torch's argmax of one 128,256-entry row is one block's reduction (26.8 us on the H200); the
two-stage version that replaced it (maxima of chunks, then the argmax of those, then a gather
and the index arithmetic) is faster but six operations. Here it is one: each program takes one
chunk of a row and stores its maximum and where it is; the last program of the row to arrive
(engine/arrivals.py) picks the first chunk holding the largest
maximum, writes the token id and resets the counter, so the buffers need no clearing between
calls.

Ties keep the first index, as torch.argmax: within a chunk tl.max's left tie-break, across chunks
the first chunk with the largest maximum. Runs under the Triton interpreter too (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.arrivals import last_to_arrive, reset_arrivals

CHUNK = 4096  # logits a program reads: 32 programs a row for a 128,256-entry vocabulary
MAX_ROWS = 8  # more rows: torch's argmax, whose one block a row is then no longer alone on the GPU


@triton.jit
def _argmax_kernel(logits_ptr, out_ptr, part_val_ptr, part_idx_ptr, count_ptr, vocab, stride_row,
                   CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, CHUNKS_POW2: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    values = tl.load(logits_ptr + row.to(tl.int64) * stride_row + offs, mask=offs < vocab, other=float("-inf"))
    best, where = tl.max(values.to(tl.float32), axis=0, return_indices=True, return_indices_tie_break_left=True)
    part = row * NUM_CHUNKS + chunk
    tl.store(part_val_ptr + part, best)
    tl.store(part_idx_ptr + part, chunk * CHUNK + where)
    if last_to_arrive(count_ptr + row, NUM_CHUNKS):  # engine/arrivals.py
        chunks = tl.arange(0, CHUNKS_POW2)
        maxima = tl.load(part_val_ptr + row * NUM_CHUNKS + chunks, mask=chunks < NUM_CHUNKS, other=float("-inf"),
                         cache_modifier=".cg")
        _, first = tl.max(maxima, axis=0, return_indices=True, return_indices_tie_break_left=True)
        token = tl.load(part_idx_ptr + row * NUM_CHUNKS + first, cache_modifier=".cg")
        tl.store(out_ptr + row, token.to(tl.int64))
        reset_arrivals(count_ptr + row)


class GreedyArgmax:
    """argmax(dim=-1) of up to MAX_ROWS rows of `vocab` logits, in one launch; its buffers are made
    once (the sampler's, per device) and stay valid between calls."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.num_chunks = triton.cdiv(vocab, CHUNK)
        self._values = torch.empty(MAX_ROWS * self.num_chunks, dtype=torch.float32, device=device)
        self._indices = torch.empty(MAX_ROWS * self.num_chunks, dtype=torch.int32, device=device)
        self._counters = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)

    def fits(self, logits: torch.Tensor) -> bool:
        rows, vocab = logits.shape
        return 0 < rows <= MAX_ROWS and vocab == self.vocab and logits.stride(-1) == 1

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids [rows] int64 of logits [rows, vocab] (any float dtype, rows strided as they come)."""
        if not self.fits(logits):
            raise ValueError(f"GreedyArgmax takes 1..{MAX_ROWS} rows of {self.vocab} logits, not {tuple(logits.shape)}")
        rows = logits.shape[0]
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
        _argmax_kernel[(rows, self.num_chunks)](
            logits, out, self._values, self._indices, self._counters, self.vocab, logits.stride(0),
            CHUNK=CHUNK, NUM_CHUNKS=self.num_chunks, CHUNKS_POW2=triton.next_power_of_2(self.num_chunks), num_warps=4,
        )
        return out
