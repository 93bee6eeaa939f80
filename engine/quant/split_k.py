"""The deterministic split-K ending shared by the batch-1 int4 kernels (kernels.py, int4_mma.py).

Why. At batch 1 a layer with few output rows (N = 4096: 64 row blocks for 132 SMs) leaves SMs
idle unless each row block's K is split over several programs. Atomically adding the slices
into y would make the sum depend on which slice arrives first, and a CUDA graph would replay
other bits each time. Instead each slice stores its fp32 partials; the last slice of the row
block to arrive (an arrival counter) adds them all in slice order, writes y, and resets the
counter to zero for the next call, so the workspace needs no clearing between replays.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.arrivals import last_to_arrive, reset_arrivals


def split_k_buffers(n: int, max_split: int, rows_per_counter: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partials [max_split, n], int32 arrival counters, zero, one per rows_per_counter rows) of
    one weight: its kernel's smallest split row block must be a multiple of rows_per_counter."""
    return (
        torch.empty(max_split, n, dtype=torch.float32, device=device),
        torch.zeros(triton.cdiv(n, rows_per_counter), dtype=torch.int32, device=device),
    )


@triton.jit
def store_row(acc, offs_n, n_mask, b_ptr, y_ptr, HAS_BIAS: tl.constexpr):
    """y[offs_n] = acc (+ bias), in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def arrive_with_partials(acc, offs_n, n_mask, pid_n, pid_k, N, part_ptr, count_ptr, SPLIT_K: tl.constexpr):
    """Stores slice pid_k's partials acc [BLOCK_N] of row block pid_n; true for the last slice to arrive."""
    tl.store(part_ptr + pid_k * N + offs_n, acc, mask=n_mask)
    return last_to_arrive(count_ptr + pid_n, SPLIT_K)  # engine/arrivals.py


@triton.jit
def sum_partials(like, offs_n, n_mask, N, part_ptr, SPLIT_K: tl.constexpr):
    """Every slice's partials of these rows, added in slice order (the last slice to arrive only)."""
    total = tl.zeros_like(like)
    for k in tl.static_range(SPLIT_K):
        total += tl.load(part_ptr + k * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def finish_split(acc, offs_n, n_mask, pid_n, pid_k, N, b_ptr, y_ptr, part_ptr, count_ptr,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Stores slice pid_k's partials acc [BLOCK_N] of row block pid_n; the last slice to arrive
    adds all of them in slice order, writes y and resets the block's counter."""
    if arrive_with_partials(acc, offs_n, n_mask, pid_n, pid_k, N, part_ptr, count_ptr, SPLIT_K):
        store_row(sum_partials(acc, offs_n, n_mask, N, part_ptr, SPLIT_K), offs_n, n_mask, b_ptr, y_ptr, HAS_BIAS)
        reset_arrivals(count_ptr + pid_n)
