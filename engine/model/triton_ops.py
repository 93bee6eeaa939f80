"""Triton kernels behind engine/model/fused_ops.py (CUDA only; tested under the interpreter)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.pdl import enter as pdl_enter
from engine.pdl import launch_options


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_res, stride_out, stride_res_out,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
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
        **launch_options(x.device, rows),
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
def _norm_rope_heads(
    base, stride_h, num_heads, w_ptr, cos, sin, eps,
    HAS_NORM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """All heads of one token as rows [BLOCK_H, HALF] per half: optional per-head RMSNorm, then Neox rotary.

    The same arithmetic as _qk_norm_rope_kernel (norm in fp32 with the same
    roundings to the input dtype, rotary in fp32), so fusing changes no bits.
    Returns both rotated halves in the input's dtype.
    """
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    row_ok = heads < num_heads  # BLOCK_H is the head count rounded up to a power of two
    ptrs = base + heads * stride_h + dims
    x1 = tl.load(ptrs, mask=row_ok, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=row_ok, other=0.0).to(tl.float32)
    dtype = base.dtype.element_ty
    if HAS_NORM:
        sq = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        rstd = tl.rsqrt(sq / (2 * HALF) + eps)[:, None]
        x1 = (x1 * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + dims).to(tl.float32)
        x2 = (x2 * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + HALF + dims).to(tl.float32)
        x1 = x1.to(dtype).to(tl.float32)
        x2 = x2.to(dtype).to(tl.float32)
    return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit
def _rope_and_cache_kernel(
    q_ptr, k_ptr, v_ptr,  # [T, H | KVH, D] strided views of the fused qkv output
    q_out_ptr,  # [T, H, D] contiguous
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, KVH, D]
    q_w_ptr, k_w_ptr,  # per-head RMSNorm weights [D] (read only when HAS_NORM)
    cos_ptr, sin_ptr,  # [max_positions, D] fp32; both halves of a row are equal, the first is read
    pos_ptr, slot_ptr,  # [T] int64
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_table,
    num_heads, num_kv_heads, block_size, eps,
    HAS_NORM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # One program per token, all of its heads: one launch replaces the q and k
    # rotary launches and the two index_copy_ of write_kv.
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF)[None, :]
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_ptr + pos * stride_table + dims)
    sin = tl.load(sin_ptr + pos * stride_table + dims)

    q1, q2 = _norm_rope_heads(
        q_ptr + t * stride_qt, stride_qh, num_heads, q_w_ptr, cos, sin, eps, HAS_NORM, HALF, BLOCK_H
    )
    q_heads = tl.arange(0, BLOCK_H)[:, None]
    q_dst = q_out_ptr + t * stride_ot + q_heads * stride_oh + dims
    tl.store(q_dst, q1, mask=q_heads < num_heads)
    tl.store(q_dst + HALF, q2, mask=q_heads < num_heads)

    # Padding rows (CUDA-graph buckets, idle speculative rows) carry real slots in
    # the null block and are written like any other row, as write_kv does. The
    # engine never makes a negative slot; one is skipped rather than written
    # in front of the cache.
    slot = tl.load(slot_ptr + t)
    kv_heads = tl.arange(0, BLOCK_KVH)[:, None]
    kv_ok = kv_heads < tl.where(slot >= 0, num_kv_heads, 0)  # one comparison: an int1 mask in every Triton mode
    block = slot // block_size
    offset = slot % block_size

    k1, k2 = _norm_rope_heads(
        k_ptr + t * stride_kt, stride_kh, num_kv_heads, k_w_ptr, cos, sin, eps, HAS_NORM, HALF, BLOCK_KVH
    )
    # k is rounded to the model dtype first, then to the cache's: the roundings of rotary-then-write_kv.
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + kv_heads * stride_kch + dims
    cache_dtype = k_cache_ptr.dtype.element_ty
    tl.store(k_dst, k1.to(cache_dtype), mask=kv_ok)
    tl.store(k_dst + HALF, k2.to(cache_dtype), mask=kv_ok)

    full = tl.arange(0, 2 * HALF)[None, :]
    v = tl.load(v_ptr + t * stride_vt + kv_heads * stride_vh + full, mask=kv_heads < num_kv_heads, other=0.0)
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + kv_heads * stride_vch + full
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=kv_ok)


def _check_heads(name: str, x: torch.Tensor, head_dim: int) -> None:
    if x.shape[-1] != head_dim or x.stride(-1) != 1:
        raise ValueError(f"{name} must be [..., {head_dim}] with unit stride in the last dimension")


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """qk_norm_rope then write_kv in one launch; returns the rotated q, contiguous [T, H, D].

    Launch parameters come from shapes only (no device values are read), so
    this can be captured in a CUDA graph.
    """
    t, heads, d = q.shape
    kv_heads = k.shape[1]
    if d & (d - 1):
        raise ValueError(f"rotary kernel needs a power-of-two head_dim, got {d}")
    for name, x in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_heads(name, x, d)
    if cos_table.stride(1) != 1 or sin_table.stride() != cos_table.stride():
        raise ValueError("cos/sin tables must share a row stride with unit-stride columns")
    q_out = torch.empty((t, heads, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return q_out
    _rope_and_cache_kernel[(t,)](
        q, k, v, q_out, k_cache, v_cache,
        q_weight if q_weight is not None else q, k_weight if k_weight is not None else k,
        cos_table, sin_table, positions, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        cos_table.stride(0),
        heads, kv_heads, k_cache.shape[1], eps,
        HAS_NORM=q_weight is not None, HALF=d // 2,
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_KVH=triton.next_power_of_2(kv_heads),
        num_warps=4, **launch_options(q.device, t),
    )
    return q_out


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr = False
):
    pdl_enter(PDL)
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
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block, **launch_options(gate_up.device, rows)
    )
    return out
