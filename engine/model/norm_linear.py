"""RMSNorm inside the next matrix product, for small batches on CUDA (one kernel instead of two or three).

A decoder layer of a small model on a decode or speculative step is bound by its
kernel launches, not by its bytes: at batch 1 the demo target's layer is ten kernels
of 1-3 us each. Two of them only normalize the hidden state for the projection that
follows, and one only applies SiLU-and-mul to gate_up's output. `norm_linear` folds
them into the projection: each program adds the residual and computes every row's
RMS itself (the rows are short), then multiplies its tile of the weight; with
`gated` it takes the gate and the up columns of the same outputs and writes
silu(gate) * up. Roundings follow the unfused path (`fused_ops.add_rmsnorm`, an
nn.Linear, `silu_and_mul`): the sum and the normalized rows in the model dtype,
products summed in fp32, the projection's output in the model dtype.

Weights are nn.Linear's [N, K] (gate_up: [2 I, K], gate rows first). Meant for
small weights (a tile loop over K per program, no split over K); the caller
checks the shapes (`fused_ops.norm_linear_fits`). Tested under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # tl.dot needs M >= 16; a step of up to 64 tokens is 1-4 row blocks
BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _load_sum(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_r, HAS_RESIDUAL: tl.constexpr):
    """x + residual, rounded to the model dtype as the unfused add is."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _norm_linear_kernel(
    x_ptr, res_ptr, sum_ptr, norm_w_ptr, w_ptr, bias_ptr, out_ptr,
    m, n_out, k_dim, eps,
    stride_x, stride_r, stride_s, stride_w, stride_o,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < m
    # Pass 1: each row's mean square (every program alike); program column 0 stores the sum.
    squares = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, k_dim, BK):
        cols = k0 + tl.arange(0, BK)
        mask = row_ok[:, None] & (cols < k_dim)[None, :]
        s = _load_sum(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_r, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            if pid_n == 0:
                tl.store(sum_ptr + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
        sf = s.to(tl.float32)
        squares += tl.sum(sf * sf, axis=1)
    rstd = tl.rsqrt(squares / k_dim + eps)
    # Pass 2: normalized rows times this program's columns of the weight (and of the up half).
    outs = pid_n * BN + tl.arange(0, BN)
    out_ok = outs < n_out
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, k_dim, BK):
        cols = k0 + tl.arange(0, BK)
        col_ok = cols < k_dim
        mask = row_ok[:, None] & col_ok[None, :]
        s = _load_sum(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_r, HAS_RESIDUAL)
        normed = (s.to(tl.float32) * rstd[:, None]).to(s.dtype).to(tl.float32)
        nw = tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        h = (normed * nw[None, :]).to(s.dtype)
        w_mask = out_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + outs[:, None] * stride_w + cols[None, :], mask=w_mask, other=0.0)
        acc += tl.dot(h, tl.trans(w))
        if GATED:
            w_up = tl.load(w_ptr + (outs + n_out)[:, None] * stride_w + cols[None, :], mask=w_mask, other=0.0)
            acc_up += tl.dot(h, tl.trans(w_up))
    out_dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)
    result = acc.to(out_dtype)
    if GATED:
        # As silu_and_mul on gate_up's output: both halves in the model dtype first.
        gate = result.to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_dtype).to(tl.float32)
        result = (act * acc_up.to(out_dtype).to(tl.float32)).to(out_dtype)
    tl.store(out_ptr + rows[:, None] * stride_o + outs[None, :], result, mask=row_ok[:, None] & out_ok[None, :])


def norm_linear(
    x: torch.Tensor,  # [M, K]
    residual: torch.Tensor | None,  # [M, K] or None (the first layer: x is the residual)
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K] (gated: [2 I, K])
    bias: torch.Tensor | None,  # [N] or None
    gated: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rmsnorm(x + residual)), x + residual); gated: silu(gate) * up of the linear's output."""
    m, k_dim = x.shape
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    # A new tensor for the sum: other programs still read x and residual while column 0 writes it.
    summed = x if residual is None else torch.empty_like(x)
    res = x if residual is None else residual
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n_out, BLOCK_N))
    _norm_linear_kernel[grid](
        x, res, summed, norm_weight, weight, bias if bias is not None else weight, out,
        m, n_out, k_dim, eps,
        x.stride(0), res.stride(0), summed.stride(0), weight.stride(0), out.stride(0),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, GATED=gated,
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, num_warps=4,
    )
    return out, summed
