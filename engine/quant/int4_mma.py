"""int4 weights on the tensor cores: the "triton-mma" backend's kernel for decode-sized batches.

Why. A batch-1 decode step reads every weight once, so the int4 matmul should run at the memory's
bandwidth. The Triton matvec of kernels.py turns each 4-bit code into an fp32 with a shift and a
logic op, then one fp32 multiply-add, plus its share of per-step cross-lane reductions: about 5
SASS instructions per weight in its loop on sm_90, so instruction issue bounds it near 2 TB/s.
Here:

* One int32 word holds 8 codes, and `(w >> 4p) & 0x000F000F | magic` makes two of them (nibbles p
  and p + 4) into two 16-bit floats OFFSET + q at once: with magic 0x43004300 each half reads as
  bf16 128 + q (7 mantissa bits, exact for q < 16); fp16 uses 0x64006400, 1024 + q. That is one
  shift and one three-input logic op per two weights, 7 instructions per 8. The magic is loaded
  from memory (MmaWorkspace.magic) rather than written as a constant: two constants do not fit one
  LOP3 (ptxas then emits an AND and an OR), and a kernel-argument scalar stops Triton from keeping
  the words in the dot's register layout (it then converts the dequantized tile through shared
  memory, 2 bytes per weight); a loaded tensor is neither.
* The multiply-adds run on the tensor cores (tl.dot: wgmma on Hopper) with the weights on the M
  side (rows = output features) and x on the N side, so the CUDA cores do no per-weight fp32 work.
* Layout (pack_mma, once at load; the checkpoint format is unchanged): per row and group of G
  codes, G/8 int32 words; nibble p + 4h (p < 4, h < 2) of word w holds the code of k = p*G/4 + 2w + h
  of the group. The shifted word's halves are then codes k, k+1 of "plane" p: exactly the pair of
  consecutive k one 32-bit register of an mma operand holds, so Triton keeps the loaded words in
  the operand's register layout and the join of the two halves moves no data. Each plane is one dot.

Counted in the compiled loop (ptxas for sm_90 from this Triton, offline, no GPU): about 1.7 SASS
instructions per weight at BLOCK_N 64 and 8 groups per step (1.5 to 2.2 over the tuned configs),
against 4.3 to 6.1 for the matvec's configs (4.9 at BLOCK_N 64, BLOCK_K 256).

Math. Per group g of row n and x row m: sum_k x_k (q_k - z) s = s (D - (OFFSET + z) X) with
D = sum_k x_k (OFFSET + q_k) (the dot, fp32 accumulation of exact products) and X = sum_k x_k.

Columns. tl.dot needs 16 columns on the N side. Column c holds x row c // STEP_GROUPS restricted
to group c % STEP_GROUPS of the step (zero elsewhere: block diagonal), so one step's dots give the
sums of STEP_GROUPS groups for 16 / STEP_GROUPS rows, and the scales and zeros are applied once
per step. Batch 1 uses STEP_GROUPS = 4..16; larger batches use fewer groups and more rows.

Split-K (batch 1 only) is deterministic (engine/quant/split_k.py): each slice stores its fp32 partials,
the last program of a row block to arrive (a counter) adds them in slice order and resets the
counter, so a CUDA graph replays the same bits.

PDL (engine/pdl.py, Hopper, launches of at most 8 rows): each program first asks the L2 for the
lines of its first PREFETCH_GROUPS groups of every row (the weights are no kernel's output), lets
the next kernel be placed, and only then waits for the kernel ahead, whose output is x.

No SiLU epilogue for gate_up: a gated form (gate and up rows paired in each row block, silu(gate) *
up stored) made the 8B int4 graph 0.009-0.017 ms slower than this product and the SiLU kernel in
three same-process A/Bs on H100s (BENCHMARKS.md, W3), and was taken out.

Norm folding (one x row; engine/model/fused_ops.py, fold_add_norm). A decoder layer's RMSNorms sit
between an int4 product that ends a residual branch (o_proj, down_proj) and one that starts the next
(gate_up, the next layer's qkv). The ending product adds the residual in its epilogue and stores the
sum s (the new residual), t = s * the norm's weight (elementwise: no row-wide reduction) and, per
NORM_SLOT_ROWS rows, the sum of s^2; the starting product multiplies t and scales its sums by
1 / RMS(s) = rsqrt(sum of those sums / K + eps) in its epilogue, where the sums are long since
written. rmsnorm(s) W^T = rstd (t W^T), so the step needs no norm kernel: at batch 1 on the 8B model,
63 of its 65 (the first layer's and the final norm stay). Roundings differ from the unfused path (t
is rounded once, the 1 / RMS is applied to the fp32 sums), within the products' own rounding.

Everything here also runs under the Triton interpreter (TRITON_INTERPRET=1; tests/engine/quant/
test_int4_mma.py): the numbers are checked there; the register layouts and the speed only on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.pdl import enter as pdl_enter
from engine.pdl import prefetch_l2, use_pdl
from engine.arrivals import reset_arrivals
from engine.quant.split_k import arrive_with_partials, split_k_buffers, sum_partials

# The 16-bit float OFFSET + q that the magic makes of a code q, per activation dtype.
OFFSET = {torch.bfloat16: 128.0, torch.float16: 1024.0}
MAGIC = {torch.bfloat16: 0x43004300, torch.float16: 0x64006400}
_MAGIC_ORDER = (torch.bfloat16, torch.float16)  # the order of MmaWorkspace.magic

MMA_COLUMNS = 16  # the N side of every dot: tl.dot's smallest
MMA_MIN_BLOCK_N = 16  # tl.dot's smallest M; the workspace has a split-K counter per 16 rows
CHUNK_K = 512  # codes of a row per weight load (64 int32 registers per thread at most, see _chunk)
SUPPORTED_GROUPS = (32, 64, 128, 256)  # 512 and up: a step of 8 groups would not fit shared memory
# Groups of each row that a program asks the L2 for before it waits for the kernel ahead (PDL only;
# a power of two). W3 on the H200: 417.5 tok/s with 8, 412.1 with none, 402.0 with 16 (BENCHMARKS.md).
PREFETCH_GROUPS = 8
# Rows of y per sum of squares that an ADD_RESIDUAL launch leaves for the next one's RMSNorm: the
# smallest row block (MMA_MIN_BLOCK_N), so the sums' layout is the same whatever config was tuned.
NORM_SLOT_ROWS = 16
_NORM_SLOT_ROWS = tl.constexpr(NORM_SLOT_ROWS)


# ----- layout ----------------------------------------------------------------------------


def pack_mma(qweight: torch.Tensor, group: int) -> torch.Tensor:
    """uint8 [N, K/2] (two codes a byte, even k low) -> int32 [N, K/8] in this kernel's layout.

    Nibble p + 4h of word w of a group holds k = p * group/4 + 2w + h of that group."""
    n, half = qweight.shape
    k = 2 * half
    q = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(n, k // group, 4, group // 8, 2)  # [n, g, p, w, h]
    nib = q.permute(0, 1, 3, 4, 2).reshape(n, k // group, group // 8, 8)  # [n, g, w, nibble p + 4h]
    byte = nib[..., 0::2] | (nib[..., 1::2] << 4)  # little endian: nibble i at bits 4i
    return byte.contiguous().view(torch.int32).reshape(n, k // 8)


def unpack_mma(words: torch.Tensor, group: int) -> torch.Tensor:
    """The inverse of pack_mma: int32 [N, K/8] -> uint8 [N, K/2], even k in the low nibble."""
    n, num_words = words.shape
    k = 8 * num_words
    byte = words.contiguous().view(torch.uint8).reshape(n, k // group, group // 8, 4)
    nib = torch.stack([byte & 0xF, byte >> 4], dim=-1).reshape(n, k // group, group // 8, 2, 4)  # [n, g, w, h, p]
    q = nib.permute(0, 1, 4, 2, 3).reshape(n, k)  # k = p * group/4 + 2w + h
    return q[:, 0::2] | (q[:, 1::2] << 4)


# ----- kernel ----------------------------------------------------------------------------


@triton.jit
def _plane(w, p: tl.constexpr, magic, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, DT: tl.constexpr):
    """Plane p of words w [BLOCK_N, WORDS]: [BLOCK_N, 2 * WORDS] of OFFSET + q in dtype DT, element
    2j + h from nibble p + 4h of word j. One shift and one logic op per word (fused by ptxas)."""
    t = ((w >> (4 * p)) & 0x000F000F) | magic
    lo = t.to(tl.int16).to(DT, bitcast=True)
    hi = (t >> 16).to(tl.int16).to(DT, bitcast=True)
    return tl.reshape(tl.join(lo, hi), [BLOCK_N, 2 * WORDS])


@triton.jit
def _chunk_dots(d, w, x_ptr, b_off, b_mask, magic, gc,
                GROUP: tl.constexpr, BLOCK_N: tl.constexpr, CW: tl.constexpr, DT: tl.constexpr):
    """d + the four planes' dots of one chunk of words w (first group gc) with their x columns."""
    PLANE: tl.constexpr = GROUP // 4
    for p in tl.static_range(4):
        a = _plane(w, p, magic, BLOCK_N, CW, DT)
        b = tl.load(x_ptr + gc * GROUP + p * PLANE + b_off, mask=b_mask, other=0.0)
        d = tl.dot(a, b, d)
    return d


@triton.jit
def _int4_mma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, count_ptr, magic_ptr, res_ptr, nw_ptr, t_ptr, sq_out_ptr, sq_in_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_ym, eps,
    GROUP: tl.constexpr, OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, STEP_GROUPS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr,
    PDL: tl.constexpr = False, PREFETCH_GROUPS: tl.constexpr = 0,
    ADD_RESIDUAL: tl.constexpr = False, NORM_IN: tl.constexpr = False, SLOTS: tl.constexpr = 1,
):
    """y = x W^T for int4 W in pack_mma's layout; program (row block, k split, block of x rows).

    A step covers STEP_GROUPS groups, loaded in chunks of CHUNK codes a row (registers); its dots
    fill the 16 accumulator columns, then the scales and zeros of its groups are applied.
    EVEN: whole row blocks and whole steps (every layer of the 8B model), so the weight loads need
    no masks: masked loads cost a predicate and a zeroed register each.
    ADD_RESIDUAL, NORM_IN (one x row; the norm folding of the module docstring): y = x W^T + residual,
    t = y * nw and each 16 rows' sum of squares of y into sq_out; y = rstd (x W^T), rstd from sq_in's
    SLOTS sums."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    ROWS: tl.constexpr = 16 // STEP_GROUPS  # x rows per program
    # Groups per weight load: the whole step, or CHUNK_K codes a row when the step is longer.
    CHUNK: tl.constexpr = STEP_GROUPS // (STEP_GROUPS * GROUP // 512 + (STEP_GROUPS * GROUP < 512))
    WPG: tl.constexpr = GROUP // 8
    PLANE: tl.constexpr = GROUP // 4
    CW: tl.constexpr = CHUNK * WPG
    CP: tl.constexpr = CHUNK * PLANE

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    col = tl.arange(0, 16)
    col_row = pid_m * ROWS + col // STEP_GROUPS  # the x row of each accumulator column
    col_grp = col % STEP_GROUPS  # and its group within the step
    col_ok = col_row < M

    num_groups = K // GROUP
    per_split = tl.cdiv(tl.cdiv(num_groups, SPLIT_K), STEP_GROUPS) * STEP_GROUPS
    g_start = pid_k * per_split
    g_end = tl.minimum(num_groups, g_start + per_split)
    if PDL and PREFETCH_GROUPS > 0:
        # The weights are no kernel's output: ask the L2 for the 128-byte lines (32 words) of this
        # program's first groups while the kernels ahead finish (engine/pdl.py).
        LINES: tl.constexpr = (PREFETCH_GROUPS * WPG + 31) // 32
        line = tl.minimum(tl.arange(0, LINES), ((g_end - g_start) * WPG - 1) // 32)
        row = w_ptr + tl.minimum(offs_n, N - 1) * stride_wn + g_start * WPG
        prefetch_l2(row[:, None] + line[None, :] * 32)
    pdl_enter(PDL)
    if NORM_IN:
        # The kernel ahead's sums of squares are complete once pdl_enter returns: read now, the main
        # loop hides the load's latency rather than the epilogue waiting on it.
        rstd = _rstd(sq_in_ptr, K, eps, SLOTS)
    if ADD_RESIDUAL:  # likewise the residual (an earlier kernel's) and the next norm's weight
        residual = tl.load(res_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        norm_w = tl.load(nw_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)

    j = tl.arange(0, CW)
    cp = tl.arange(0, CP)
    cp_grp = cp // PLANE  # the group (within the chunk) of each plane position
    # x of plane position cp (plane 0, first chunk) for each column; zero off the block diagonal
    b_off = (cp_grp * GROUP + cp % PLANE)[:, None] + (col_row * stride_xm)[None, :]
    x_grp = tl.arange(0, GROUP)[:, None] + (col_grp * GROUP + col_row * stride_xm)[None, :]
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    magic = tl.load(magic_ptr + tl.zeros([1, 1], dtype=tl.int32))
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    for g0 in range(g_start, g_end, STEP_GROUPS):
        d = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        for ch in tl.static_range(STEP_GROUPS // CHUNK):
            gc = g0 + ch * CHUNK
            b_mask = ((ch * CHUNK + cp_grp)[:, None] == col_grp[None, :]) & col_ok[None, :]
            if EVEN:
                w = tl.load(w_rows + gc * WPG + j[None, :])
            else:
                w_mask = n_mask[:, None] & (gc + j // WPG < g_end)[None, :]
                w = tl.load(w_rows + gc * WPG + j[None, :], mask=w_mask, other=0)
                b_mask = b_mask & (gc + cp_grp < g_end)[:, None]
            d = _chunk_dots(d, w, x_ptr, b_off, b_mask, magic, gc, GROUP, BLOCK_N, CW, DT)
        grp = g0 + col_grp
        g_ok = col_ok if EVEN else col_ok & (grp < g_end)
        xg = tl.load(x_ptr + g0 * GROUP + x_grp, mask=g_ok[None, :], other=0.0).to(tl.float32)
        xsum = tl.sum(xg, axis=0)  # [16]: sum of x over each column's group
        sz = offs_n[:, None] * stride_sn + grp[None, :]
        sz_mask = n_mask[:, None] & g_ok[None, :]
        s = tl.load(s_ptr + sz, mask=sz_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz, mask=sz_mask, other=0).to(tl.float32)
        acc += s * (d - (OFFSET + z) * xsum[None, :])
    if SPLIT_K == 1:
        out = tl.sum(tl.reshape(acc, [BLOCK_N, ROWS, STEP_GROUPS]), axis=2)  # [BLOCK_N, ROWS]
        rows = pid_m * ROWS + tl.arange(0, ROWS)
        if NORM_IN:
            out = out * rstd
        if ADD_RESIDUAL:  # one x row: the other columns of out are zero
            total = tl.sum(out, axis=1)
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            _store_with_residual(total, residual, norm_w, offs_n, n_mask, pid_n, N, y_ptr, t_ptr, sq_out_ptr, BLOCK_N)
        else:
            if HAS_BIAS:
                out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            y_off = rows[None, :] * stride_ym + offs_n[:, None]
            tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & (rows < M)[None, :])
    else:
        # One x row (the host allows a split only then): the other rows' columns are zero.
        partial = tl.sum(acc, axis=1)
        if arrive_with_partials(partial, offs_n, n_mask, pid_n, pid_k, N, part_ptr, count_ptr, SPLIT_K):
            total = sum_partials(partial, offs_n, n_mask, N, part_ptr, SPLIT_K)
            if NORM_IN:
                total = total * rstd
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if ADD_RESIDUAL:
                _store_with_residual(total, residual, norm_w, offs_n, n_mask, pid_n, N, y_ptr, t_ptr, sq_out_ptr, BLOCK_N)
            else:
                tl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty), mask=n_mask)
            reset_arrivals(count_ptr + pid_n)


@triton.jit
def _rstd(sq_ptr, K, eps, SLOTS: tl.constexpr):
    """1 / RMS of the kernel ahead's y (K values) from its sums of squares per 16 of them."""
    i = tl.arange(0, SLOTS)
    sq = tl.load(sq_ptr + i, mask=i < K // _NORM_SLOT_ROWS, other=0.0, cache_modifier=".cg")
    return tl.rsqrt(tl.sum(sq, axis=0) / K + eps)


@triton.jit
def _store_with_residual(y, residual, norm_w, offs_n, n_mask, pid_n, N, y_ptr, t_ptr, sq_ptr, BLOCK_N: tl.constexpr):
    """y + residual (rounded as the unfused add: y in y's dtype first) into y, that times the next
    RMSNorm's weight norm_w into t, and the sum of the squares of each NORM_SLOT_ROWS rows of the
    sum into sq: what the next kernel needs to apply the norm to t's product."""
    dt = y_ptr.dtype.element_ty
    summed = (y.to(dt).to(tl.float32) + residual).to(dt)
    tl.store(y_ptr + offs_n, summed, mask=n_mask)
    tl.store(t_ptr + offs_n, (summed.to(tl.float32) * norm_w).to(dt), mask=n_mask)
    sf = tl.where(n_mask, summed.to(tl.float32), 0.0)
    sq = tl.sum(tl.reshape(sf * sf, [BLOCK_N // _NORM_SLOT_ROWS, _NORM_SLOT_ROWS]), axis=1)
    slot = pid_n * (BLOCK_N // _NORM_SLOT_ROWS) + tl.arange(0, BLOCK_N // _NORM_SLOT_ROWS)
    tl.store(sq_ptr + slot, sq, mask=slot < tl.cdiv(N, _NORM_SLOT_ROWS))


# ----- autotuning ------------------------------------------------------------------------

# Batch 1: (BLOCK_N, STEP_GROUPS, SPLIT_K, warps, stages) as read for group 128. wgmma wants 64
# rows per warpgroup (BLOCK_N 64 with 4 warps; fewer rows fall back to mma.sync, whose operand
# loads cost more than they save). stages >= 2 copies weights and x columns into shared memory
# asynchronously (cp.async), stages - 1 steps ahead; stages = 1 stores each dot's x columns from
# registers, behind a proxy fence. A split adds programs where N / BLOCK_N alone leaves SMs idle
# (N = 4096: 64 row blocks for 132 SMs). The list holds each 8B layer's winners of a 43-config
# sweep on the H200 with weights cold in L2, as in the model (bench/int4_mma_sweep.py,
# docs/bench/w3-h200-int4-sweep.json): qkv (64,4,4,4,2) 10.0 us, o and down (64,4,4,4,3) 8.1 and
# 16.4 us, gate_up and lm_head (64,4,1,4,2) 27.0 and 92.2 us; the runners-up; and deeper
# pipelines of the same tiles, untimed there. Loading the next chunk's words into registers ahead
# of the dots (at stages 1) was slower than cp.async in that sweep. Each entry is a compile at
# engine start: twelve of them.
_MMA_CONFIGS = [
    (64, 4, 1, 4, 2), (64, 4, 4, 4, 2), (64, 4, 4, 4, 3), (64, 8, 4, 4, 2), (64, 8, 4, 4, 1), (64, 8, 1, 4, 2),
    (64, 4, 1, 4, 3), (64, 4, 2, 4, 3), (64, 4, 8, 4, 3), (64, 4, 4, 4, 4), (64, 8, 4, 4, 3), (64, 4, 2, 4, 2),
]
MMA_MAX_SPLIT = max(c[2] for c in _MMA_CONFIGS)


def _fits(step_groups: int, split: int, group: int, num_groups: int) -> bool:
    """A step's plane of one chunk spans >= 16 k (a dot's K); a split gets at least one step."""
    chunk = step_groups if step_groups * group <= CHUNK_K else CHUNK_K // group
    return step_groups <= MMA_COLUMNS and chunk * group // 4 >= 16 and (split == 1 or split * step_groups <= num_groups)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    group = kwargs.get("GROUP", named_args.get("GROUP"))
    num_groups = named_args["K"] // group
    kept = [c for c in configs if _fits(c.kwargs["STEP_GROUPS"], c.kwargs["SPLIT_K"], group, num_groups)]
    if kept:
        return kept
    return [triton.Config({"BLOCK_N": 64, "STEP_GROUPS": max(1, 64 // group), "SPLIT_K": 1}, num_warps=4, num_stages=1)]


def _bench(fn, quantiles) -> float | list[float]:
    # As kernels._bench: short, an engine start tunes every distinct layer shape once.
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _even(args: dict) -> bool:
    """Whole row blocks and whole steps: no masks on the weight loads (the kernel's EVEN)."""
    return args["N"] % args["BLOCK_N"] == 0 and (args["K"] // args["GROUP"]) % args["STEP_GROUPS"] == 0


def _autotuned(configs: list[tuple[int, int, int, int, int]]):
    return triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": n, "STEP_GROUPS": sg, "SPLIT_K": sk}, num_warps=w, num_stages=st)
            for n, sg, sk, w, st in configs
        ],
        key=["N", "K", "GROUP"],
        prune_configs_by={"early_config_prune": _prune},
        do_bench=_bench,
    )(triton.heuristics({"EVEN": _even})(_int4_mma_kernel))


_int4_mma_tuned = _autotuned(_MMA_CONFIGS)


def rows_config(m: int, group: int) -> dict:
    """The (untuned) config for m > 1 rows: as many rows per program as fit the 16 columns, up to m."""
    rows = min(MMA_COLUMNS, triton.next_power_of_2(m))
    step = max(MMA_COLUMNS // rows, 64 // group)  # a chunk's plane spans >= 16 k
    return {"BLOCK_N": 64, "STEP_GROUPS": step, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1}


# ----- host side -------------------------------------------------------------------------


@dataclass(frozen=True)
class MmaWorkspace:
    """One weight's buffers: split-K fp32 partials [MMA_MAX_SPLIT, N], one arrival counter per 16
    rows (zero between calls: the last program of a block resets its own), the magic words
    per activation dtype (loaded by the kernel, see the module docstring), and the fp32 sums of
    squares per NORM_SLOT_ROWS rows of y that a launch with a residual leaves for the next one."""

    partials: torch.Tensor
    counters: torch.Tensor
    magic: torch.Tensor
    squares: torch.Tensor

    @classmethod
    def for_rows(cls, n: int, device: torch.device) -> "MmaWorkspace":
        magic = torch.tensor([MAGIC[dt] for dt in _MAGIC_ORDER], dtype=torch.int32, device=device)
        squares = torch.zeros(triton.cdiv(n, NORM_SLOT_ROWS), dtype=torch.float32, device=device)
        return cls(*split_k_buffers(n, MMA_MAX_SPLIT, MMA_MIN_BLOCK_N, device), magic, squares)


def int4_mma_matmul(
    x: torch.Tensor,  # [M, K] bf16 or fp16, rows contiguous
    words: torch.Tensor,  # int32 [N, K/8], pack_mma's layout
    scales: torch.Tensor,  # [N, K/group]
    zeros: torch.Tensor,  # uint8 [N, K/group]
    bias: torch.Tensor | None,
    group: int,
    workspace: MmaWorkspace | None = None,
    config: dict | None = None,
    pdl: bool | None = None,
    prefetch_groups: int | None = None,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_squares: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x @ W^T (+ bias) in x's dtype. `config` pins the tile sizes (tests, self-check); otherwise
    batch 1 is autotuned and more rows take rows_config. A layer passes its own workspace,
    allocated once, so a captured CUDA graph owns no allocation and layers share no counters.
    `pdl` (None: engine/pdl.py's choice for m rows) launches it with programmatic dependent launch,
    its programs asking the L2 for their first `prefetch_groups` groups of each row before they wait
    (None: PREFETCH_GROUPS).
    One x row only, the norm folding of the module docstring: `residual` [1, N] and the next RMSNorm's
    `norm_weight` [N] return (s = x W^T + residual, s * norm_weight) and leave the sums of squares of
    s in workspace.squares; `norm_squares` (such sums of the s whose t is x, from the kernel ahead)
    returns rstd (x W^T) (+ bias), rstd = 1 / sqrt(mean(s^2) + eps)."""
    if x.dtype not in OFFSET:
        raise ValueError(f"the int4 mma kernel takes bf16 or fp16 activations, not {x.dtype}")
    if group not in SUPPORTED_GROUPS:
        raise ValueError(f"the int4 mma kernel takes group sizes {SUPPORTED_GROUPS}, not {group}")
    m, k = x.shape
    n = words.shape[0]
    _check_norm_folding(x, n, residual, norm_weight, norm_squares)
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    ws = workspace if workspace is not None else MmaWorkspace.for_rows(n, x.device)
    i = _MAGIC_ORDER.index(x.dtype)
    b = bias if bias is not None else scales  # an unused pointer without bias
    # Unused pointers when not folding.
    res, nw = (residual, norm_weight) if residual is not None else (y, y)
    t = torch.empty_like(y) if residual is not None else y
    sq_in = norm_squares if norm_squares is not None else ws.squares
    args = (x, words, scales, zeros, b, y, ws.partials, ws.counters, ws.magic[i : i + 1], res, nw, t, ws.squares, sq_in,
            m, n, k, x.stride(0), words.stride(0), scales.stride(0), y.stride(0), eps)
    on = use_pdl(x.device, m) if pdl is None else pdl
    common = dict(GROUP=group, OFFSET=OFFSET[x.dtype], HAS_BIAS=bias is not None, PDL=on, launch_pdl=on,
                  PREFETCH_GROUPS=(PREFETCH_GROUPS if prefetch_groups is None else prefetch_groups) if on else 0, ADD_RESIDUAL=residual is not None,
                  NORM_IN=norm_squares is not None, SLOTS=triton.next_power_of_2(triton.cdiv(k, NORM_SLOT_ROWS)))
    if config is None and m == 1:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], 1)  # noqa: E731
        _int4_mma_tuned[grid](*args, **common)
        return (y, t) if residual is not None else y
    cfg = dict(config) if config is not None else rows_config(m, group)
    _check_config(cfg, m, group)
    rows = MMA_COLUMNS // cfg["STEP_GROUPS"]
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg.get("SPLIT_K", 1), triton.cdiv(m, rows))
    tiles = dict(BLOCK_N=cfg["BLOCK_N"], STEP_GROUPS=cfg["STEP_GROUPS"], SPLIT_K=cfg.get("SPLIT_K", 1))
    even = _even(dict(tiles, N=n, K=k, GROUP=group))
    _int4_mma_kernel[grid](
        *args, **common, **tiles, EVEN=even, num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1)
    )
    return (y, t) if residual is not None else y


def _check_norm_folding(x: torch.Tensor, n: int, residual: torch.Tensor | None,
                        norm_weight: torch.Tensor | None, norm_squares: torch.Tensor | None) -> None:
    m, k = x.shape
    if (residual is None) != (norm_weight is None):
        raise ValueError("a residual for an int4 mma product comes with the next RMSNorm's weight, and only with it")
    if residual is None and norm_squares is None:
        return
    if m != 1:
        raise ValueError(f"the int4 mma kernel folds a residual or an RMSNorm for one row of x, not {m}")
    if residual is not None:
        if norm_weight.shape != (n,) or norm_weight.stride(0) != 1:
            raise ValueError(f"the RMSNorm weight after an int4 mma product is [{n}], contiguous, not {tuple(norm_weight.shape)}")
        if residual.shape != (1, n) or residual.dtype != x.dtype or residual.stride(-1) != 1 or n % NORM_SLOT_ROWS:
            raise ValueError(f"a residual for an int4 mma product is [1, {n}] in {x.dtype}, contiguous, "
                             f"N a multiple of {NORM_SLOT_ROWS}; got {tuple(residual.shape)}")
    if norm_squares is not None and (k % NORM_SLOT_ROWS or norm_squares.numel() < k // NORM_SLOT_ROWS):
        raise ValueError(f"an RMSNorm folded into an int4 mma product needs K a multiple of {NORM_SLOT_ROWS} "
                         f"and {k // NORM_SLOT_ROWS} sums of squares, got K {k}, {norm_squares.numel()}")


def _check_config(cfg: dict, m: int, group: int) -> None:
    split, step = cfg.get("SPLIT_K", 1), cfg["STEP_GROUPS"]
    if split > 1 and (m != 1 or split > MMA_MAX_SPLIT):
        raise ValueError(f"int4 mma config {cfg}: a split needs one x row and at most {MMA_MAX_SPLIT} slices")
    if cfg["BLOCK_N"] < MMA_MIN_BLOCK_N or MMA_COLUMNS % step or not _fits(step, 1, group, 1):
        raise ValueError(f"int4 mma config {cfg} does not fit group {group}")
