"""Triton kernels behind engine/model/fused_ops.py (CUDA only; tested under the interpreter)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_res, stride_out, stride_res_out,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the model dtype first, as the unfused model does.
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)).to(
            x.dtype
        )
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(x.dtype), mask=mask)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = x.shape
    out = torch.empty_like(x)
    if residual is None:
        res_in, res_out = x, x
    else:
        res_in, res_out = residual, torch.empty_like(x)
    _add_rmsnorm_kernel[(rows,)](
        x, res_in, weight, out, res_out,
        x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
        n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=4,
    )
    return out, res_out


@triton.jit
def _qk_norm_rope_kernel(
    x_ptr, out_ptr, w_ptr, cos_ptr, sin_ptr, pos_ptr,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_table,
    num_heads, eps,
    HAS_NORM: tl.constexpr, HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid // num_heads
    h = pid % num_heads
    offs = tl.arange(0, HALF)
    base = x_ptr + t * stride_xt + h * stride_xh
    x1 = tl.load(base + offs).to(tl.float32)
    x2 = tl.load(base + HALF + offs).to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
        dtype = x_ptr.dtype.element_ty
        x1 = (x1 * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + offs).to(tl.float32)
        x2 = (x2 * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + HALF + offs).to(tl.float32)
        x1 = x1.to(dtype).to(tl.float32)
        x2 = x2.to(dtype).to(tl.float32)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_ptr + pos * stride_table + offs)
    sin = tl.load(sin_ptr + pos * stride_table + offs)
    obase = out_ptr + t * stride_ot + h * stride_oh
    tl.store(obase + offs, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty))
    tl.store(obase + HALF + offs, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty))


def _norm_rope(x, table_cos, table_sin, positions, weight, eps) -> torch.Tensor:
    t, heads, d = x.shape
    if d & (d - 1) or x.stride(2) != 1:
        raise ValueError(f"rotary kernel needs a power-of-two, unit-stride head_dim, got {d}")
    out = torch.empty((t, heads, d), dtype=x.dtype, device=x.device)
    _qk_norm_rope_kernel[(t * heads,)](
        x, out, weight if weight is not None else x, table_cos, table_sin, positions,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), table_cos.stride(0),
        heads, eps,
        HAS_NORM=weight is not None, HALF=d // 2, num_warps=1,
    )
    return out


def qk_norm_rope(q, k, cos_table, sin_table, positions, q_weight, k_weight, eps):
    return (
        _norm_rope(q, cos_table, sin_table, positions, q_weight, eps),
        _norm_rope(k, cos_table, sin_table, positions, k_weight, eps),
    )


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    rows, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block)
    return out
