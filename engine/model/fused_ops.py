"""Fused elementwise stages of the forward pass: Triton on CUDA, plain torch elsewhere.

Each of these is several small kernels in eager torch (casts, pow, mean,
rsqrt, muls, cat); on a decode step of a small model those launches and the
extra passes over memory cost more than the matrix products. The torch
versions are the reference: they are what runs on the CPU and what the
Triton versions are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.backend import write_kv
from engine.quant.base import QuantLinear


# ----- torch reference ---------------------------------------------------------------


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in fp32 and cast back before the weight, as transformers does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary embedding; x [T, heads, D], cos/sin [T, D] (fp32)."""
    cos = cos.to(x.dtype).unsqueeze(1)
    sin = sin.to(x.dtype).unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ----- dispatch ----------------------------------------------------------------------


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual); with no residual, x itself is the new residual."""
    if x.is_cuda:
        from engine.model import triton_ops

        return triton_ops.add_rmsnorm(x, residual, weight, eps)
    summed = x if residual is None else x + residual
    return rmsnorm_ref(summed, weight, eps), summed


def qk_norm_rope(
    q: torch.Tensor,  # [T, H, D] (may be a strided view of the fused qkv output)
    k: torch.Tensor,  # [T, KVH, D]
    cos_table: torch.Tensor,  # [max_positions, D] fp32
    sin_table: torch.Tensor,
    positions: torch.Tensor,  # [T]
    q_weight: torch.Tensor | None,  # per-head RMSNorm weights (Qwen3), or None
    k_weight: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional per-head RMSNorm of q and k, then rotary; contiguous outputs."""
    if q.is_cuda:
        from engine.model import triton_ops

        return triton_ops.qk_norm_rope(q, k, cos_table, sin_table, positions, q_weight, k_weight, eps)
    if q_weight is not None:
        q, k = rmsnorm_ref(q, q_weight, eps), rmsnorm_ref(k, k_weight, eps)
    cos, sin = cos_table[positions], sin_table[positions]
    return rotate_ref(q, cos, sin), rotate_ref(k, cos, sin)


def rope_and_cache(
    q: torch.Tensor,  # [T, H, D] (strided views of the fused qkv output are fine)
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    cos_table: torch.Tensor,  # [max_positions, D] fp32
    sin_table: torch.Tensor,
    positions: torch.Tensor,  # [T]
    q_weight: torch.Tensor | None,  # per-head RMSNorm weights (Qwen3), or None
    k_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D], any float dtype (cast on store)
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
) -> torch.Tensor:
    """qk_norm_rope, then write_kv of the rotated k and v; returns the rotated q, contiguous.

    On CUDA this is one kernel where the unfused path launches four per layer
    (rotary of q, of k, and write_kv's two index_copy_): at batch-1 decode
    each of those is a few microseconds of launch and latency for a few KB.
    """
    if q.is_cuda:
        from engine.model import triton_ops

        return triton_ops.rope_and_cache(
            q, k, v, cos_table, sin_table, positions, q_weight, k_weight, eps, k_cache, v_cache, slot_mapping
        )
    q, k = qk_norm_rope(q, k, cos_table, sin_table, positions, q_weight, k_weight, eps)
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    if gate_up.is_cuda:
        from engine.model import triton_ops

        return triton_ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# engine/model/norm_linear.py folds a norm into the projection after it for steps of up to this
# many tokens, and weights of up to this many elements: there a layer is bound by its launches.
# Its programs hold whole rows of the hidden state, up to NORM_LINEAR_MAX_HIDDEN. The weight limit
# is measured (H200, bench/norm_linear.py --sweep): 1.34-1.48x faster than norm + cuBLAS (+ SiLU)
# on the demo target's qkv and gate_up (0.25M, 0.79M weights, 1-48 tokens), 0.75-0.94x on
# Qwen3-0.6B's qkv (4.2M) at 1-16 tokens and 0.41x at 48: cuBLAS wins once the weight is big.
NORM_LINEAR_MAX_TOKENS = 64
NORM_LINEAR_MAX_WEIGHT = 1 << 20
NORM_LINEAR_MAX_HIDDEN = 1024


@dataclass(frozen=True)
class NormedHidden:
    """The hidden state as a projection with the residual add in its kernel leaves it (fold_add_norm):
    summed = x + residual (the new residual), weighted = summed * the next RMSNorm's weight, and
    squares, summed's sums of squares per few values. The projection after the norm applies the
    norm's 1 / RMS to its own output, so the step has no norm kernel of its own."""

    summed: torch.Tensor
    weighted: torch.Tensor
    squares: torch.Tensor


def fold_add_norm(
    linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module, next_linear: nn.Module
) -> NormedHidden | None:
    """linear(x) + residual, made ready for norm and then next_linear inside linear's kernel, where
    both layers can (int4 in the tensor-core form, one token: engine/quant/int4_mma.py); else None."""
    if residual is None or not isinstance(linear, QuantLinear) or not isinstance(next_linear, QuantLinear):
        return None
    if not residual.is_contiguous() or residual.dtype != x.dtype:
        return None
    if not (linear.folds_residual(x) and next_linear.folds_norm(x)):
        return None
    return NormedHidden(*linear.forward_add_residual(x, residual, norm.weight))


def norm_linear(
    x: torch.Tensor | NormedHidden,
    residual: torch.Tensor | None,
    norm: nn.Module,  # an RMSNorm: .weight, .eps
    linear: nn.Module,
    gated: bool,  # the linear is gate_up: silu(gate) * up of its output
    fuse: bool,  # the one-kernel path where it fits (CUDA, a small step, a plain bf16 / fp16 nn.Linear)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rmsnorm(x + residual)), x + residual), gated: silu_and_mul of the linear's output.
    x a NormedHidden (residual None): the norm's rest in linear's kernel (fold_add_norm)."""
    if isinstance(x, NormedHidden):
        return linear.forward_normed(x.weighted, x.squares, norm.eps, gated), x.summed
    if fuse and _norm_linear_fits(x, residual, linear):
        from engine.model import norm_linear as kernel

        return kernel.norm_linear(x, residual, norm.weight, norm.eps, linear.weight, linear.bias, gated)
    h, residual = add_rmsnorm(x, residual, norm.weight, norm.eps)
    out = linear(h)
    return (silu_and_mul(out) if gated else out), residual


def _norm_linear_fits(x: torch.Tensor, residual: torch.Tensor | None, linear: nn.Module) -> bool:
    # type(), not isinstance: a quantized layer swapped in (engine/quant) multiplies its own way.
    return (
        x.is_cuda
        and x.shape[0] <= NORM_LINEAR_MAX_TOKENS
        and x.shape[1] <= NORM_LINEAR_MAX_HIDDEN
        and x.stride(-1) == 1
        and (residual is None or residual.stride(-1) == 1)
        and type(linear) is nn.Linear
        and linear.weight.dtype in (torch.bfloat16, torch.float16)
        and linear.weight.dtype == x.dtype
        and linear.weight.numel() <= NORM_LINEAR_MAX_WEIGHT
    )
