"""RMSNorm inside the next matrix product, for small batches on CUDA (one kernel instead of two or three).

A decoder layer of a small model on a decode or speculative step is bound by its
kernel launches, not by its bytes: at batch 1 the demo target's layer is ten kernels
of 1-3 us each. Two of them only normalize the hidden state for the projection that
follows, and one only applies SiLU-and-mul to gate_up's output. `norm_linear` folds
them into the projection: each program adds the residual and computes every row's
RMS itself (the rows are short), then multiplies its tile of the weight; with
`gated` it takes the gate and the up columns of the same outputs and writes
silu(gate) * up. A program holds whole rows (K up to MAX_HIDDEN) and multiplies
them in one tl.dot: no loop, so a step waits on a few loads, not on a chain of
them. Roundings follow the unfused path (`fused_ops.add_rmsnorm`, an nn.Linear,
`silu_and_mul`): the sum and the normalized rows in the model dtype, products
summed in fp32, the projection's output in the model dtype.

Weights are nn.Linear's [N, K] (gate_up: [2 I, K], gate rows first). Meant for
small models; fused_ops checks the shapes before it calls this. Tested under the
interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.model.fused_ops import NORM_LINEAR_MAX_HIDDEN as MAX_HIDDEN

BLOCK_M = 16  # tl.dot needs M >= 16; a step of up to 64 tokens is 1-4 row blocks
BLOCK_N = 32


@triton.jit
def _norm_linear_kernel(
    x_ptr, res_ptr, sum_ptr, norm_w_ptr, w_ptr, bias_ptr, out_ptr,
    m, n_out, k_dim, eps,
    stride_x, stride_r, stride_s, stride_w, stride_o,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,  # BK: K rounded up to a power of 2
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = tl.arange(0, BK)
    row_ok = rows < m
    col_ok = cols < k_dim
    mask = row_ok[:, None] & col_ok[None, :]
    # Whole rows in one load (no loop: a short step waits on a few loads, not on a chain of them).
    s = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(s.dtype)  # rounded, as the unfused add is
        if pid_n == 0:
            tl.store(sum_ptr + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=1) / k_dim + eps)
    normed = (sf * rstd[:, None]).to(s.dtype).to(tl.float32)
    nw = tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    h = (normed * nw[None, :]).to(s.dtype)
    # This program's outputs: rows of the weight (and the same rows of its up half).
    outs = pid_n * BN + tl.arange(0, BN)
    out_ok = outs < n_out
    w_mask = out_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + outs[:, None] * stride_w + cols[None, :], mask=w_mask, other=0.0)
    acc = tl.dot(h, tl.trans(w))
    out_dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)
    result = acc.to(out_dtype)
    if GATED:
        w_up = tl.load(w_ptr + (outs + n_out)[:, None] * stride_w + cols[None, :], mask=w_mask, other=0.0)
        up = tl.dot(h, tl.trans(w_up)).to(out_dtype).to(tl.float32)
        # As silu_and_mul on gate_up's output: both halves in the model dtype first.
        gate = result.to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_dtype).to(tl.float32)
        result = (act * up).to(out_dtype)
    tl.store(out_ptr + rows[:, None] * stride_o + outs[None, :], result, mask=row_ok[:, None] & out_ok[None, :])


def norm_linear(
    x: torch.Tensor,  # [M, K], K <= MAX_HIDDEN
    residual: torch.Tensor | None,  # [M, K] or None (the first layer: x is the residual)
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K] (gated: [2 I, K])
    bias: torch.Tensor | None,  # [N] or None
    gated: bool,
    block_n: int = BLOCK_N,  # tile sizes: bench/norm_linear.py --sweep times others
    num_warps: int | None = None,  # None: 4, or 8 for rows wider than 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rmsnorm(x + residual)), x + residual); gated: silu(gate) * up of the linear's output."""
    m, k_dim = x.shape
    if k_dim > MAX_HIDDEN:
        raise ValueError(f"norm_linear holds whole rows of up to {MAX_HIDDEN}, got {k_dim}")
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    # A new tensor for the sum: other programs still read x and residual while column 0 writes it.
    summed = x if residual is None else torch.empty_like(x)
    res = x if residual is None else residual
    bk = max(triton.next_power_of_2(k_dim), 16)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n_out, block_n))
    _norm_linear_kernel[grid](
        x, res, summed, norm_weight, weight, bias if bias is not None else weight, out,
        m, n_out, k_dim, eps,
        x.stride(0), res.stride(0), summed.stride(0), weight.stride(0), out.stride(0),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, GATED=gated,
        BM=BLOCK_M, BN=block_n, BK=bk, num_warps=num_warps or (4 if bk <= 512 else 8),
    )
    return out, summed
