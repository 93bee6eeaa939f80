"""Triton kernels for quantized linear layers: y = x @ W^T (+ bias), W dequantized in registers.

Weights are read once in their packed form and never written back in a
wider type: on a decode step (a few rows of x) the matrix product is bound
by the bytes of W, so int8 reads half and int4 a quarter of bf16's bytes.
Accumulation is fp32.

Formats (the `FMT` constexpr):
  0  int8, per output channel:   W[n, k] = q[n, k] * s[n]
  1  int4, per group of GROUP k:  W[n, k] = (q[n, k] - z[n, g]) * s[n, g], g = k // GROUP;
     q packed two per byte along k, the even k in the low nibble: byte[n, j] = q[n, 2j] | q[n, 2j+1] << 4
  2  fp8 e4m3, per output channel, with per-row (per-token) fp8 activations:
     y[m, n] = sum_k fp8(x[m, k] / a[m]) * q[n, k] * a[m] * s[n], a[m] = max_k |x[m, k]| / 448

Two kernels: `_matvec_kernel` for one row of x (batch-1 decode: fp32
multiply-adds and reductions, codes turned into floats by bit tricks rather
than conversion instructions, many small programs to keep the memory system
busy) and `_matmul_kernel` for more rows (tensor-core tl.dot on the
dequantized tiles). The layers call them for small M (decode, speculative
verification) and dequantize + cuBLAS for large M (prefill).

Everything here also runs under the Triton interpreter (TRITON_INTERPRET=1)
on the CPU, which is how tests/engine/quant/test_kernels.py checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.quant.split_k import finish_split, split_k_buffers, store_row

FMT_INT8, FMT_INT4, FMT_FP8 = 0, 1, 2
FP8_MAX = 448.0  # largest finite float8_e4m3fn


# ----- kernels -------------------------------------------------------------------------


@triton.jit
def _row_fp8_scale(x_row_ptr, K, BLOCK_K: tl.constexpr):
    """max|x| / 448 of one row (the per-token scale), at least 1e-12 / 448."""
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    return tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0


@triton.jit
def _matvec_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    N, K, stride_wn, stride_sn,
    FMT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[n] = sum_k x[k] W[n, k] for one row x, int8 or fp8 (int4: _int4_matvec_kernel).

    A program owns BLOCK_N outputs and loops over K. int8 weights arrive as int32 words
    (4 codes each, k ascending from the low bits) and are turned into floats without int-to-float conversions, whose
    hardware rate (1/8 of fp32's) would cap the kernel below the memory bandwidth: a code c
    of b bits is shifted into the top of an fp32 mantissa and OR-ed with the exponent of
    1.0, which reads as 1 + c / 2^b. Then sum_k (1 + c/2^b) x = X + sum_k c x / 2^b with
    X = sum_k x, so sum_k c x = 2^b (sum_k (1 + c/2^b) x - X): one shift, one logic op
    and one multiply-add per weight.
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if FMT == 0:
        NW: tl.constexpr = BLOCK_K // 4
        j_ar = tl.arange(0, NW)
        num_words = K // 4
        part = tl.zeros([BLOCK_N, NW], dtype=tl.float32)
        xsum = tl.zeros([NW], dtype=tl.float32)
        for j0 in range(0, num_words, NW):
            word = j0 + j_ar
            j_mask = word < num_words
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + word[None, :],
                mask=n_mask[:, None] & j_mask[None, :],
                other=0,
            )
            w = w ^ -2139062144  # 0x80808080: each signed byte q becomes q + 128 in 1..255
            for i in tl.static_range(4):  # byte i of a word is k = 4 * word + i
                if i <= 1:
                    t = w << (15 - 8 * i)
                else:
                    t = w >> (8 * i - 15)
                f = ((t & 0x007F8000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + (q + 128) / 256
                xi = tl.load(x_ptr + 4 * word + i, mask=j_mask, other=0.0).to(tl.float32)
                part += f * xi[None, :]
                xsum += xi
        # sum q x = 256 (sum (1 + (q+128)/256) x - X) - 128 X
        acc = 256.0 * tl.sum(part, axis=1) - 384.0 * tl.sum(xsum, axis=0)
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    else:
        a = _row_fp8_scale(x_ptr, K, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            x = tl.clamp(x / a, -448.0, 448.0).to(tl.float8e4nv).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) * a
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _int4_code_as_float(w, i: tl.constexpr, exp_one):
    """1 + q / 16 for the 4-bit code i of int32 words w (k = 8 * word + i, at bits 4i..4i+3).

    The code is shifted to the top of an fp32 mantissa and OR-ed with the exponent of 1.0:
    one shift and one logic op, no int-to-float conversion (1/8 of the fp32 rate)."""
    if i <= 4:
        t = w << (19 - 4 * i)
    else:
        t = w >> (4 * i - 19)
    return ((t & 0x00780000) | exp_one).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_quad_as_floats(quad):
    """The four bf16 of an int64 (k ascending from the low bits) as fp32: a bf16 is the top half
    of its fp32, so a shift or a mask converts each, no conversion instruction."""
    lo = quad.to(tl.int32)
    hi = (quad >> 32).to(tl.int32)
    return (
        (lo << 16).to(tl.float32, bitcast=True),
        (lo & -65536).to(tl.float32, bitcast=True),  # -65536 = 0xFFFF0000
        (hi << 16).to(tl.float32, bitcast=True),
        (hi & -65536).to(tl.float32, bitcast=True),
    )


@triton.jit
def _int4_word_dot(w, x_ptr, word, mask, exp_one, X_QUADS: tl.constexpr):
    """(sum_i (1 + q_i/16) x_i per word of w, sum_i x_i per word) over the 8 codes of each word.

    X_QUADS: x_ptr holds x as int64 words of four bf16, so the 8 x values of a weight word
    are two 8-byte loads (not eight 2-byte ones); a thread reuses them for every row it holds."""
    part = tl.zeros(w.shape, dtype=tl.float32)
    xsum = tl.zeros(word.shape, dtype=tl.float32)
    if X_QUADS:
        for h in tl.static_range(2):
            quad = tl.load(x_ptr + 2 * word + h, mask=mask, other=0)
            x0, x1, x2, x3 = _bf16_quad_as_floats(quad)
            part += _int4_code_as_float(w, 4 * h, exp_one) * x0[None, :, :]
            part += _int4_code_as_float(w, 4 * h + 1, exp_one) * x1[None, :, :]
            part += _int4_code_as_float(w, 4 * h + 2, exp_one) * x2[None, :, :]
            part += _int4_code_as_float(w, 4 * h + 3, exp_one) * x3[None, :, :]
            xsum += (x0 + x1) + (x2 + x3)
    else:
        for i in tl.static_range(8):
            xi = tl.load(x_ptr + 8 * word + i, mask=mask, other=0.0).to(tl.float32)
            part += _int4_code_as_float(w, i, exp_one) * xi[None, :, :]
            xsum += xi
    return part, xsum


@triton.jit
def _int4_matvec_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, count_ptr,
    N, K, stride_wn, stride_sn, exp_one,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, X_QUADS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """y = x W^T for one row x and int4 W (format 1), program (n block, k split).

    Weights are int32 words of 8 codes; a tile is [BLOCK_N, NG, WPG] words: NG whole groups
    per step, so a group's scale and zero apply once to its partial sum,
    s * (sum_k q x - z sum_k x). A thread holds a few consecutive words of several rows, so
    the x values it loads serve all those rows: loads, not arithmetic, were what kept the
    one-element-at-a-time version at half the memory bandwidth.

    SPLIT_K > 1: the K range is cut in SPLIT_K slices, one program each (at batch 1 a
    4096-wide output has too few row blocks to keep every SM's loads in flight). Each
    program stores its fp32 partial sums; the last of a row block to arrive (a counter)
    adds them in slice order, so the result does not depend on arrival order, and resets
    the counter for the next call, so one launch is all a CUDA graph replays.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    NG: tl.constexpr = BLOCK_K // GROUP
    WPG: tl.constexpr = GROUP // 8  # words per group
    num_groups = K // GROUP
    per_split = tl.cdiv(tl.cdiv(num_groups, SPLIT_K), NG) * NG
    g_start = pid_k * per_split
    g_end = tl.minimum(num_groups, g_start + per_split)
    g_ar = tl.arange(0, NG)
    j_ar = tl.arange(0, WPG)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g0 in range(g_start, g_end, NG):
        g = g0 + g_ar
        g_mask = g < g_end
        word = g[:, None] * WPG + j_ar[None, :]  # [NG, WPG] word index within a row
        w = tl.load(
            w_ptr + offs_n[:, None, None] * stride_wn + word[None, :, :],
            mask=n_mask[:, None, None] & g_mask[None, :, None],
            other=0,
        )
        part, xsum = _int4_word_dot(w, x_ptr, word, g_mask[:, None], exp_one, X_QUADS)
        qx = tl.sum(part, axis=2)  # [BLOCK_N, NG]: sum (1 + q/16) x
        xg = tl.sum(xsum, axis=1)  # [NG]: sum x
        sz_off = offs_n[:, None] * stride_sn + g[None, :]
        sz_mask = n_mask[:, None] & g_mask[None, :]
        s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_off, mask=sz_mask, other=0).to(tl.float32)
        # sum (q - z) x = 16 (qx - X) - z X
        acc += tl.sum(s * (16.0 * qx - (16.0 + z) * xg[None, :]), axis=1)
    if SPLIT_K == 1:
        store_row(acc, offs_n, n_mask, b_ptr, y_ptr, HAS_BIAS)
    else:
        finish_split(acc, offs_n, n_mask, pid_n, pid_k, N, b_ptr, y_ptr, part_ptr, count_ptr, HAS_BIAS, SPLIT_K)


@triton.jit
def _matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    FMT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A [BLOCK_M, BLOCK_N] tile of y per program, tl.dot on tiles dequantized to x's dtype."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    ct = x_ptr.dtype.element_ty  # the dot's operand type: integers up to 255 and fp8 values are exact in it
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FMT == 1:
        # One group per step (BLOCK_K is unused): the even and odd k of the group are two dots.
        HALF: tl.constexpr = GROUP // 2
        j_ar = tl.arange(0, HALF)
        for g in range(0, K // GROUP):
            byte = g * HALF + j_ar
            wq = tl.load(w_ptr + offs_n[None, :] * stride_wn + byte[:, None], mask=n_mask[None, :], other=0)
            lo = (wq & 0xF).to(ct)  # [HALF, BLOCK_N]
            hi = (wq >> 4).to(ct)
            x_off = offs_m[:, None] * stride_xm + 2 * byte[None, :]
            xe = tl.load(x_ptr + x_off, mask=m_mask[:, None], other=0.0)  # [BLOCK_M, HALF]
            xo = tl.load(x_ptr + x_off + 1, mask=m_mask[:, None], other=0.0)
            part = tl.dot(xe, lo, input_precision=DOT_PRECISION)
            part = tl.dot(xo, hi, part, input_precision=DOT_PRECISION)
            xsum = tl.sum(xe.to(tl.float32) + xo.to(tl.float32), axis=1)
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)
            acc += s[None, :] * (part - xsum[:, None] * z[None, :])
    else:
        if FMT == 2:
            # Per-row fp8 scales of this program's rows, in a first pass over K.
            amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :],
                    other=0.0,
                ).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            a = tl.maximum(tl.max(amax, axis=1), 1e-12) / 448.0  # [BLOCK_M]
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                mask=n_mask[None, :] & k_mask[:, None],
                other=0.0,
            ).to(ct)  # [BLOCK_K, BLOCK_N]
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if FMT == 2:
                x = tl.clamp(x.to(tl.float32) / a[:, None], -448.0, 448.0).to(tl.float8e4nv).to(ct)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if FMT == 2:
            acc = acc * a[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


# ----- autotuning ------------------------------------------------------------------------

# Matvec (int8, fp8): (BLOCK_N, BLOCK_K, warps, stages). Small BLOCK_N gives many programs,
# which is what keeps enough loads in flight when N is 4096; a long BLOCK_K makes each load wide.
# Few configs on purpose: each is a compile (~1 s) per format at engine start.
_MATVEC = [(8, 512, 4, 2), (16, 256, 4, 2), (16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 8, 3), (8, 1024, 4, 2)]
_MATMUL = [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 4)]  # (BLOCK_N, BLOCK_K, warps, stages)

# int4 matvec: (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages). A thread holds 4 words (32 codes) of
# a row and BLOCK_N * BLOCK_K / (32 * 32 * warps) rows, 4 or 8 here, so its x loads serve that
# many rows; SPLIT_K > 1 adds programs where N / BLOCK_N alone leaves SMs idle (N = 4096 at
# batch 1). stages > 1 lets the compiler issue the next step's weight loads before this
# step's arithmetic, more bytes in flight per SM for a kernel bound by memory latency; the
# last six configs add that, and longer steps. The autotuner picks per shape on the device.
_INT4_MATVEC = [
    (64, 256, 1, 4, 1), (128, 256, 1, 4, 1), (32, 256, 1, 2, 1), (64, 256, 1, 2, 1),
    (64, 256, 2, 4, 1), (64, 256, 4, 4, 1), (32, 256, 4, 2, 1), (64, 256, 8, 4, 1), (32, 256, 8, 2, 1),
    (64, 256, 1, 4, 3), (64, 256, 4, 4, 3), (128, 256, 2, 8, 3),
    (64, 512, 1, 4, 2), (32, 512, 4, 4, 2), (64, 512, 2, 8, 2),
]
INT4_MAX_SPLIT = max(c[2] for c in _INT4_MATVEC)
INT4_MIN_BLOCK_N = 8  # the smallest BLOCK_N a split may use: the workspace has a counter per 8 rows


def _bench(fn, quantiles):
    # Shorter than Triton's default (25 ms warm-up, 100 ms of reps): an engine start tunes
    # every distinct layer shape once, and these kernels take microseconds.
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_matvec_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in _MATVEC],
    key=["N", "K", "FMT"],
    do_bench=_bench,
)(_matvec_kernel)


def _prune_int4_matvec(configs, named_args, **kwargs):
    # Steps over whole groups (BLOCK_K a multiple of GROUP); a split gets at least one step.
    group = kwargs.get("GROUP", named_args.get("GROUP"))
    num_groups = named_args["K"] // group
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_K"] % group == 0 and c.kwargs["SPLIT_K"] * (c.kwargs["BLOCK_K"] // group) <= num_groups
    ]
    if kept:
        return kept
    return [triton.Config({"BLOCK_N": 32, "BLOCK_K": group, "SPLIT_K": 1}, num_warps=4, num_stages=1)]


_int4_matvec_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": sk}, num_warps=w, num_stages=st)
        for n, k, sk, w, st in _INT4_MATVEC
    ],
    key=["N", "K", "GROUP", "X_QUADS"],
    prune_configs_by={"early_config_prune": _prune_int4_matvec},
    do_bench=_bench,
)(_int4_matvec_kernel)


def _prune_matmul(configs, named_args, **kwargs):
    # int4 steps one group at a time and ignores BLOCK_K: configs that differ only there are one.
    if kwargs.get("FMT", named_args.get("FMT")) != FMT_INT4:
        return configs
    seen, kept = set(), []
    for c in configs:
        key = (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            kept.append(c)
    return kept


_matmul_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in _MATMUL],
    key=["N", "K", "FMT", "GROUP", "BLOCK_M"],
    prune_configs_by={"early_config_prune": _prune_matmul},
    do_bench=_bench,
)(_matmul_kernel)


# ----- host side -------------------------------------------------------------------------


def block_m_for(m: int) -> int:
    """Rows per program of the matmul kernel: 16 (tl.dot's smallest), 32 or 64."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


def quant_matmul(
    x: torch.Tensor,  # [M, K], contiguous rows
    fmt: int,
    qweight: torch.Tensor,  # int8 [N, K] | uint8 [N, K // 2] | float8_e4m3fn [N, K]
    scales: torch.Tensor,  # [N] (int8, fp8) | [N, K // group] (int4)
    zeros: torch.Tensor | None = None,  # uint8 [N, K // group] (int4)
    bias: torch.Tensor | None = None,
    group: int = 0,
    config: dict | None = None,
    workspace: "Int4Workspace | None" = None,
) -> torch.Tensor:
    """x @ W^T (+ bias) in x's dtype. `config` pins the tile sizes (tests); otherwise autotuned.

    workspace: the int4 matvec's split-K buffers for this weight (Int4Workspace); a fresh one
    when None. A layer keeps its own, allocated once, so a captured CUDA graph owns no
    allocation and two layers never share counters."""
    m, k = x.shape
    n = qweight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    if fmt == FMT_INT4 and m == 1 and k % 8 == 0:
        ws = workspace if workspace is not None else Int4Workspace.for_rows(n, x.device)
        _int4_matvec(x, qweight, scales, zeros, bias, group, y, ws, config)
        return y
    z = zeros if zeros is not None else scales  # an unused pointer for int8 / fp8
    b = bias if bias is not None else scales
    stride_sn = scales.stride(0)
    common = dict(FMT=fmt, GROUP=max(group, 1), HAS_BIAS=bias is not None)
    # The int8 matvec reads codes as int32 words: rows must hold whole words.
    whole_words = fmt == FMT_FP8 or (fmt == FMT_INT8 and k % 4 == 0)
    if m == 1 and whole_words:
        w = qweight.view(torch.int32) if fmt == FMT_INT8 else qweight  # int8 codes as words
        args = (x, w, scales, z, b, y, n, k, w.stride(0), stride_sn)
        if config is None:
            _matvec_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **common)
        else:
            cfg = dict(config)
            grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
            _matvec_kernel[grid](*args, **common, **_launch(cfg))
        return y
    block_m = config.get("BLOCK_M", block_m_for(m)) if config else block_m_for(m)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    args = (x, qweight, scales, z, b, y, m, n, k, x.stride(0), qweight.stride(0), stride_sn, y.stride(0))
    common.update(DOT_PRECISION=precision, BLOCK_M=block_m)
    if config is None:
        _matmul_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))](*args, **common)
    else:
        cfg = {key: v for key, v in config.items() if key != "BLOCK_M"}
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, block_m))
        _matmul_kernel[grid](*args, **common, **_launch(cfg))
    return y


@dataclass(frozen=True)
class Int4Workspace:
    """Split-K buffers of one int4 weight: fp32 partial sums [INT4_MAX_SPLIT, N] and one arrival
    counter per row block, zero between calls (the last program of a block resets its own)."""

    partials: torch.Tensor
    counters: torch.Tensor

    @classmethod
    def for_rows(cls, n: int, device: torch.device) -> "Int4Workspace":
        return cls(*split_k_buffers(n, INT4_MAX_SPLIT, INT4_MIN_BLOCK_N, device))


def _int4_matvec(x, qweight, scales, zeros, bias, group, y, ws: Int4Workspace, config: dict | None) -> None:
    n, k = qweight.shape[0], x.shape[1]
    # bf16 rows are read as int64 words of four values (8-byte aligned: rows of whole groups).
    quads = x.dtype == torch.bfloat16 and x.data_ptr() % 8 == 0
    xv = x.view(torch.int64) if quads else x
    w = qweight.view(torch.int32)  # 8 codes per word
    b = bias if bias is not None else scales  # an unused pointer without bias
    args = (xv, w, scales, zeros, b, y, ws.partials, ws.counters, n, k, w.stride(0), scales.stride(0), _EXP_ONE)
    common = dict(GROUP=group, HAS_BIAS=bias is not None, X_QUADS=quads)
    if config is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _int4_matvec_tuned[grid](*args, **common)
        return
    split = config.get("SPLIT_K", 1)
    if split > INT4_MAX_SPLIT or config["BLOCK_N"] < INT4_MIN_BLOCK_N and split > 1:
        raise ValueError(f"int4 matvec config {config} does not fit the workspace")
    launch = _launch(config) | {"SPLIT_K": split}
    _int4_matvec_kernel[(triton.cdiv(n, config["BLOCK_N"]), split)](*args, **common, **launch)


# The exponent of 1.0 as int32 bits, passed as an argument rather than written as a constant:
# the compiler then fuses "& mask | exponent" into one three-input logic op (two constants
# do not fit one instruction), a third fewer instructions per weight.
_EXP_ONE = 0x3F800000


def _launch(cfg: dict) -> dict:
    out = {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"]}
    out["num_warps"] = cfg.get("num_warps", 4)
    out["num_stages"] = cfg.get("num_stages", 2)
    return out
