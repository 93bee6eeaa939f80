"""engine/quant/split_k.py under the Triton interpreter: the split-K ending both int4 kernels share.

A tiny kernel stands in for them: program (row block, slice) holds partials that are exact in
fp32 (small integers), so y must equal their sum exactly, written once by the last slice, with
the bias added and every counter back at zero for the next call.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from engine.quant.split_k import finish_split, split_k_buffers  # noqa: E402


@triton.jit
def _slices_kernel(src_ptr, b_ptr, y_ptr, part_ptr, count_ptr, N,
                   BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.load(src_ptr + pid_k * N + offs_n, mask=n_mask, other=0.0)  # this slice's partials
    finish_split(acc, offs_n, n_mask, pid_n, pid_k, N, b_ptr, y_ptr, part_ptr, count_ptr, HAS_BIAS, SPLIT_K)


@pytest.mark.parametrize("split", [2, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_the_last_slice_writes_the_sum_and_resets_the_counters(split, bias):
    n, block_n = 40, 16  # a ragged last row block
    gen = torch.Generator().manual_seed(split)
    src = torch.randint(-50, 50, (split, n), generator=gen).float()
    b = torch.randint(-5, 5, (n,), generator=gen).float()
    partials, counters = split_k_buffers(n, 8, block_n, torch.device("cpu"))
    assert partials.shape == (8, n) and counters.shape == (3,) and not counters.any()
    y = torch.full((n,), float("nan"))
    grid = (triton.cdiv(n, block_n), split)
    for _ in range(2):  # a second call finds the counters at zero again
        _slices_kernel[grid](src, b, y, partials, counters, n, BLOCK_N=block_n, SPLIT_K=split, HAS_BIAS=bias)
        assert torch.equal(y, src.sum(0) + (b if bias else 0))
        assert not counters.any()
