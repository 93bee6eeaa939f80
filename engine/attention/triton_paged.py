"""Paged attention in Triton: the CUDA path (decode and prefill).

Both kernels read K/V straight from the paged cache, [num_blocks, block_size,
KVH, D], through the block tables, and give the same result as
`torch_ref.paged_attention_ref` (the oracle of their tests).

One program serves all `group` query heads of one KV head, so each K/V tile
is loaded once per group; the group is padded to the 16 rows `tl.dot` needs.
Softmax is online (running max and sum, in base 2), accumulation in fp32.

Decode splits long contexts over several programs (flash-decoding): each
writes a partial output and its log-sum-exp, and a small kernel combines
them; or, given arrival counters (split_counters), the last split of each
(token, KV head) to finish combines its heads itself, so a layer's attention is
one kernel, not two. The decode graphs use the small kernel: on an H100 the
8B model's int4 graph at batch 1 was 0.08-0.12 ms faster with it
(bench/decode_graph_ab.py, BENCHMARKS.md W3). It also serves passes where
every sequence feeds the same few tokens
(speculative verify, the draft's catch-up): each token is then a decode
query of its own, whose context ends at its position. The prefill kernel
would give such a pass one program per (sequence, KV head), walking the
whole context alone; split, it is about half the time at batch 1. The number of splits comes from shapes only (batch, KV heads, block
table width), never from device values, so a decode step can be captured
in a CUDA graph: nothing here syncs with the device.

Under PDL (engine/pdl.py) a decode program does what needs nothing of the kernel ahead (qkv's
product) before it waits: it reads its sequence's length, position, rotary row, cache slot and
block ids, and asks the L2 for the keys and values of its first tokens, so that after the wait only
q and the new token's own key and value are read from far away. With _DECODE_PRELOAD (off until a
device run shows it faster) a launch of a few sequences reads its first tile of keys and values
into registers there too, in tiles long enough that a short context needs no split and no combine
kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.arrivals import last_to_arrive, reset_arrivals
from engine.pdl import enter as pdl_enter
from engine.pdl import PDL_MAX_ROWS, launch_options, prefetch_l2

_LOG2E = 1.4426950408889634

# Tile sizes. Decode is bound by K/V reads; prefill by the two matmuls.
_DECODE_BLOCK_N = 64
_DECODE_MIN_ROWS = 16  # tl.dot needs M >= 16
_DECODE_MAX_SPLITS = 64
# A split of one tile still pays at batch 1: 256 tokens, 8 KV heads on the H200 took 9.3 / 7.0 / 5.6 /
# 5.7 us with 1 / 2 / 4 / 8 splits (bench/int4_mma_sweep.py, docs/bench/w3-h200-int4-sweep.json).
_DECODE_MIN_SPLIT_TOKENS = _DECODE_BLOCK_N
# A decode program reads what no kernel of the step writes (its sequence's length, position, rotary
# row, cache slot and block ids) before its PDL wait, and asks the L2 for its first tokens' keys and
# values there: up to this many of them (two tiles; a batch of 8 long contexts then asks ~20 MB).
_DECODE_PREFETCH_TOKENS = 2 * _DECODE_BLOCK_N
_DECODE_EARLY_READS = True  # False: every read after the wait (bench/decode_graph_ab.py's 'attn-late-reads')
# Launches of a few sequences (at most PDL_MAX_ROWS) with the rotary in the kernel (it then writes
# the new token's key and value itself, and no kernel ahead writes the cache) may read their first
# tile of keys and values into registers before the wait too, so that after it only q and the new
# token's row are fetched. Their tile is then _DECODE_PRELOAD_BLOCK_N tokens, and so is a split's
# least share: a context up to that long is one program a KV head and needs no combine kernel.
# Off until a device run shows it faster (bench/decode_graph_ab.py's 'attn-wide', 'attn-preload').
_DECODE_PRELOAD = False
_DECODE_PRELOAD_BLOCK_N = 256
_PREFILL_BLOCK_M = 128  # rows per program: query tokens x padded group heads
_PREFILL_BLOCK_N = 64


@triton.jit
def _load_kv_tile(bt_row, pos, pos_ok, k_ptr, v_ptr, kvh, dims, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                  stride_vh, BLOCK_SIZE: tl.constexpr):
    """The cached keys and values [tile, D] of KV head kvh at positions `pos` (zero where not pos_ok)."""
    block = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
    slot = pos % BLOCK_SIZE
    k = tl.load(
        k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_kt + kvh * stride_kh + dims[None, :],
        mask=pos_ok[:, None],
        other=0.0,
    )
    v = tl.load(
        v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vt + kvh * stride_vh + dims[None, :],
        mask=pos_ok[:, None],
        other=0.0,
    )
    return k, v


@triton.jit
def _fold_tile(q, m_i, l_i, acc, visible, k, v, qk_scale, DOT_PRECISION: tl.constexpr):
    """One tile of keys k and values v [tile, D] for the rows of q: their scores where `visible`
    [rows, tile], folded into the running max m_i, sum l_i and output acc (online softmax, base 2).
    Returns the new (m_i, l_i, acc)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, visible, pos, pos_ok, bt_row, k_ptr, v_ptr, kvh, dims, qk_scale,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One tile of cached positions `pos` (those with pos_ok exist), read from the cache and folded
    in (_fold_tile). Returns the new (m_i, l_i, acc)."""
    k, v = _load_kv_tile(bt_row, pos, pos_ok, k_ptr, v_ptr, kvh, dims, stride_kb, stride_kt, stride_kh,
                         stride_vb, stride_vt, stride_vh, BLOCK_SIZE)
    return _fold_tile(q, m_i, l_i, acc, visible, k, v, qk_scale, DOT_PRECISION)


@triton.jit(do_not_specialize=["stride_btb"])  # the table's width moves with the batch
def _decode_kernel(
    q_ptr,  # [T, H, D], T = B * QUERY_LEN
    k_ptr,  # [num_blocks, block_size, KVH, D]
    v_ptr,
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [T, H, D], written when NUM_SPLITS == 1
    mid_o_ptr,  # [T, H, NUM_SPLITS, D] fp32, written when NUM_SPLITS > 1
    mid_lse_ptr,  # [T, H, NUM_SPLITS] fp32 (base 2)
    qk_scale,  # softmax scale * log2(e)
    num_heads,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_btb,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    QUERY_LEN: tl.constexpr,  # new tokens per sequence, the last at position seq_len - 1
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr = False,
    count_ptr=None,  # [T * KVH] int32 arrival counters, zero between calls: the last split combines
    SPLITS_POW2: tl.constexpr = 1,
    # ROPE (QUERY_LEN 1; DecodeRope): q_ptr holds the new tokens' raw queries, rotated here, and the
    # split holding a token's position rotates its raw key and writes it and its value to the cache
    # first. k_new / v_new: [T, KVH, D] views with the same strides (stride_nt, stride_nh).
    ROPE: tl.constexpr = False,
    k_new_ptr=None, v_new_ptr=None, cos_ptr=None, sin_ptr=None, pos_ptr=None, slot_ptr=None,
    stride_nt=0, stride_nh=0, stride_table=0,
    EARLY_READS: tl.constexpr = False, PREFETCH_TOKENS: tl.constexpr = 0,
    PRELOAD: tl.constexpr = False,  # ROPE and EARLY_READS only: the first tile's K/V read before the wait
):
    # EARLY_READS: the step's own inputs (sequence lengths, positions, cache slots, block tables,
    # staged by a copy before the step's first kernel and written by no kernel launched with PDL),
    # the rotary tables and the cached keys and values of earlier steps are read before the wait
    # for the kernel ahead (qkv's product), which only q and the new token's key and value need.
    if not EARLY_READS:
        pdl_enter(PDL)
    t = tl.program_id(0)  # the query token
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b = t // QUERY_LEN  # its sequence

    # Token j of the sequence's QUERY_LEN sits at seq_len - QUERY_LEN + j: causal, it sees up to there.
    seq_len = tl.load(seq_lens_ptr + b) - (QUERY_LEN - 1 - t % QUERY_LEN)
    # This split's share of the context, in whole tiles.
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    rows = tl.arange(0, GROUP_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < GROUP
    heads = kvh * GROUP + rows
    q_rows = q_ptr + t.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_btb
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        pos_t = tl.load(pos_ptr + t)
        cos = tl.load(cos_ptr + pos_t * stride_table + dims % HALF)  # the table's two halves are equal
        sin = tl.load(sin_ptr + pos_t * stride_table + dims % HALF)
        slot = tl.load(slot_ptr + t)
    # The loop's first tile: read here when PRELOAD (the cache's rows of earlier steps; the new
    # token's row, stale until this kernel writes it, is replaced below), else in the loop.
    first = start + BLOCK_N if PRELOAD else start
    if PRELOAD:
        pos0 = start + tl.arange(0, BLOCK_N)
        ok0 = pos0 < end
        k0, v0 = _load_kv_tile(bt_row, pos0, ok0, k_ptr, v_ptr, kvh, dims, stride_kb, stride_kt, stride_kh,
                               stride_vb, stride_vt, stride_vh, BLOCK_SIZE)
    if EARLY_READS:
        if PDL:  # the new token's line too: the store after the wait updates it in the L2
            _prefetch_kv(bt_row, first, end, k_ptr, v_ptr, kvh, stride_kb, stride_kt, stride_kh,
                         stride_vb, stride_vt, stride_vh, BLOCK_SIZE, HEAD_DIM, BLOCK_N, PREFETCH_TOKENS)
        pdl_enter(PDL)
    if ROPE:
        q = _rotated(q_rows, dims[None, :], row_ok[:, None], cos[None, :], sin[None, :], HALF)
        if (seq_len - 1 >= start) & (seq_len - 1 < end):  # this split reads the new position
            new = t.to(tl.int64) * stride_nt + kvh * stride_nh
            k_new = _rotated(k_new_ptr + new, dims, dims < 2 * HALF, cos, sin, HALF).to(k_ptr.dtype.element_ty)
            v_new = tl.load(v_new_ptr + new + dims).to(v_ptr.dtype.element_ty)
            _write_new_kv(k_new, v_new, slot, k_ptr, v_ptr, kvh, dims, stride_kb, stride_kt, stride_kh,
                          stride_vb, stride_vt, stride_vh, BLOCK_SIZE)
            tl.debug_barrier()  # the CTA's stores land before its threads read a tile that holds them
            if PRELOAD:  # the first tile as the cache now holds it (a skipped slot, < 0, is not written)
                is_new = ((pos0 == seq_len - 1) & (slot >= 0))[:, None]
                k0 = tl.where(is_new, k_new[None, :], k0)
                v0 = tl.where(is_new, v_new[None, :], v0)
    else:
        q = tl.load(q_rows + dims[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)

    # -1e30 rather than -inf: a fully masked row then gives p = 0, never NaN.
    m_i = tl.full([GROUP_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_M], dtype=tl.float32)
    acc = tl.zeros([GROUP_M, HEAD_DIM], dtype=tl.float32)
    if PRELOAD:
        m_i, l_i, acc = _fold_tile(q, m_i, l_i, acc, ok0[None, :], k0, v0, qk_scale, DOT_PRECISION)
    for start_n in range(first, end, BLOCK_N):
        pos = start_n + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, pos_ok[None, :], pos, pos_ok, bt_row, k_ptr, v_ptr, kvh, dims, qk_scale,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, BLOCK_SIZE, DOT_PRECISION,
        )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        out = out_ptr + t.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        mid = (t * num_heads + heads).to(tl.int64) * NUM_SPLITS + split
        tl.store(mid_o_ptr + mid[:, None] * HEAD_DIM + dims[None, :], o, mask=row_ok[:, None])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))  # -inf: an empty split, weight 0
        tl.store(mid_lse_ptr + mid, lse, mask=row_ok)
        if count_ptr is not None:  # the last split of this (token, KV head) combines (engine/arrivals.py)
            counter = count_ptr + t * tl.num_programs(1) + kvh
            if last_to_arrive(counter, NUM_SPLITS):
                for g in tl.static_range(GROUP):
                    _combine_head(mid_o_ptr, mid_lse_ptr, out_ptr, t, kvh * GROUP + g, num_heads, stride_ob, stride_oh,
                                  HEAD_DIM, NUM_SPLITS, SPLITS_POW2)
                reset_arrivals(counter)


@triton.jit
def _rotated(base, dims, mask, cos, sin, HALF: tl.constexpr):
    """Neox rotary of the rows at base + dims [.., 2 HALF], in fp32, back in the input's dtype: the
    arithmetic of rope_and_cache (engine/model/triton_ops.py)."""
    x = tl.load(base + dims, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(base + (dims + HALF) % (2 * HALF), mask=mask, other=0.0).to(tl.float32)
    return (x * cos + tl.where(dims < HALF, -partner, partner) * sin).to(base.dtype.element_ty)


@triton.jit
def _prefetch_kv(bt_row, start, end, k_ptr, v_ptr, kvh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                 BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, TOKENS: tl.constexpr):
    """Asks the L2 for the key and value lines of this program's first TOKENS positions (of start..end)."""
    BITS: tl.constexpr = k_ptr.dtype.element_ty.primitive_bitwidth
    ROW_LINES: tl.constexpr = (HEAD_DIM * BITS // 8 + 127) // 128  # 128-byte lines of one token's row
    line = tl.arange(0, ROW_LINES) * (1024 // BITS)  # elements from a row's start to each of its lines
    for first in range(start, tl.minimum(end, start + TOKENS), BLOCK_N):
        pos = tl.minimum(first + tl.arange(0, BLOCK_N), end - 1)  # past the end: the last line again
        block = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
        slot = pos % BLOCK_SIZE
        prefetch_l2(k_ptr + (block * stride_kb + slot * stride_kt + kvh * stride_kh)[:, None] + line[None, :])
        prefetch_l2(v_ptr + (block * stride_vb + slot * stride_vt + kvh * stride_vh)[:, None] + line[None, :])


@triton.jit
def _write_new_kv(k, v, slot, k_ptr, v_ptr, kvh, dims, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                  stride_vh, BLOCK_SIZE: tl.constexpr):
    """One token's rotated key k and its value v [D] (in the cache's dtype: k rounded to the model
    dtype first, as rope_and_cache does), of KV head kvh, into the cache at `slot`; a negative slot
    is skipped."""
    ok = dims < tl.where(slot >= 0, k.shape[0], 0)
    block = (slot // BLOCK_SIZE).to(tl.int64)
    offset = slot % BLOCK_SIZE
    tl.store(k_ptr + block * stride_kb + offset * stride_kt + kvh * stride_kh + dims, k, mask=ok)
    tl.store(v_ptr + block * stride_vb + offset * stride_vt + kvh * stride_vh + dims, v, mask=ok)


@triton.jit
def _combine_head(mid_o_ptr, mid_lse_ptr, out_ptr, b, h, num_heads, stride_ob, stride_oh,
                  HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr):
    """out[b, h] = the splits' partial outputs of token b, head h, weighted by their log-sum-exps."""
    splits = tl.arange(0, SPLITS_POW2)
    dims = tl.arange(0, HEAD_DIM)
    split_ok = splits < NUM_SPLITS
    base = (b * num_heads + h).to(tl.int64) * NUM_SPLITS
    # .cg: from the L2, where the other splits' stores are; never a stale line of this SM's L1.
    lse = tl.load(mid_lse_ptr + base + splits, mask=split_ok, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # empty context: every weight 0, output 0
    w = tl.exp2(lse - m)
    # Read beside the log-sum-exps, not after them: every split stores its partials, zero for an
    # empty one (weight 0), so no load waits on another.
    o = tl.load(mid_o_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
                mask=split_ok[:, None], other=0.0, cache_modifier=".cg")
    num = tl.sum(w[:, None] * o, 0)
    den = tl.sum(w, 0)
    out = num / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr,  # [B, H, NUM_SPLITS, D] fp32
    mid_lse_ptr,  # [B, H, NUM_SPLITS] fp32 (base 2)
    out_ptr,  # [B, H, D]
    num_heads,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    _combine_head(mid_o_ptr, mid_lse_ptr, out_ptr, tl.program_id(0), tl.program_id(1), num_heads, stride_ob, stride_oh,
                  HEAD_DIM, NUM_SPLITS, SPLITS_POW2)


@triton.jit(do_not_specialize=["stride_btb"])  # the table's width moves with the batch
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [num_blocks, block_size, KVH, D]
    v_ptr,
    block_tables_ptr,  # [B, max_blocks] int32
    query_start_loc_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [T, H, D]
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_btb,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per program
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    tile_q0 = tile * BLOCK_Q
    if tile_q0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len  # context already cached before this step's tokens

    # Row r of the tile is query token tile_q0 + r // GROUP_PAD, head r % GROUP_PAD of the group.
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_idx = tile_q0 + rows // GROUP_PAD
    head = kvh * GROUP + rows % GROUP_PAD
    row_ok = (q_idx < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = prefix + q_idx
    dims = tl.arange(0, HEAD_DIM)
    tok = (q_start + q_idx).to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    ).to(k_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_Q * GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_btb
    # Causal: nothing past the tile's last query position is read.
    kv_end = tl.minimum(seq_len, prefix + tile_q0 + BLOCK_Q)
    for start_n in range(0, kv_end, BLOCK_N):
        pos = start_n + tl.arange(0, BLOCK_N)
        pos_ok = pos < kv_end
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, visible, pos, pos_ok, bt_row, k_ptr, v_ptr, kvh, dims, qk_scale,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, BLOCK_SIZE, DOT_PRECISION,
        )

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _strides(q, k_cache, v_cache, block_tables, out) -> tuple[int, ...]:
    """The strides both kernels take, in their parameter order."""
    return (
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
    )


def _check_shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Returns (group, head_dim, block_size, num_kv_heads) after checking the layouts."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"Triton paged attention needs head_dim a power of two >= 16, got {head_dim}")
    if block_size & (block_size - 1):
        raise ValueError(f"Triton paged attention needs block_size a power of two, got {block_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} do not match q's head_dim")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last dimension")
    return num_heads // num_kv_heads, head_dim, block_size, num_kv_heads


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise run as tf32 on the GPU.
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter on the CPU: act like an H100


def decode_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      min_split_tokens: int = _DECODE_MIN_SPLIT_TOKENS) -> int:
    """How many programs share one (sequence, KV head): enough for ~2 waves on the GPU.

    Shapes only, so the same answer at CUDA-graph capture and replay.
    """
    programs = batch * num_kv_heads
    want = -(-2 * num_sms // programs)
    by_len = max(1, max_seq_len // min_split_tokens)
    return max(1, min(want, by_len, _DECODE_MAX_SPLITS))


@dataclass(frozen=True)
class DecodeRope:
    """What the decode kernel needs to rotate the new tokens itself (one new token per sequence): no
    rope_and_cache kernel ahead of it. q is then the raw queries; k_new, v_new: [T, KVH, D] raw keys
    and values (views of the qkv output, same strides); the cos / sin tables [positions, D] fp32
    (both halves of a row equal), each token's position and cache slot."""

    k_new: torch.Tensor
    v_new: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor

    def check(self, q: torch.Tensor, num_kv_heads: int, query_len: int) -> None:
        t, _, d = q.shape
        if query_len != 1:
            raise ValueError(f"the decode kernel rotates one new token per sequence, not {query_len}")
        for name, x in (("k_new", self.k_new), ("v_new", self.v_new)):
            if x.shape != (t, num_kv_heads, d) or x.stride(2) != 1 or x.dtype != q.dtype:
                raise ValueError(f"{name} must be [{t}, {num_kv_heads}, {d}] in {q.dtype}, unit stride, got {tuple(x.shape)}")
        if self.k_new.stride() != self.v_new.stride():
            raise ValueError("k_new and v_new must share strides (views of one qkv output)")
        if self.cos_table.stride(1) != 1 or self.sin_table.stride() != self.cos_table.stride():
            raise ValueError("cos/sin tables must share a row stride with unit-stride columns")

    def kernel_args(self) -> dict:
        return dict(
            ROPE=True, k_new_ptr=self.k_new, v_new_ptr=self.v_new, cos_ptr=self.cos_table, sin_ptr=self.sin_table,
            pos_ptr=self.positions, slot_ptr=self.slot_mapping, stride_nt=self.k_new.stride(0),
            stride_nh=self.k_new.stride(1), stride_table=self.cos_table.stride(0),
        )


def paged_decode_attention(
    q: torch.Tensor,  # [B * query_len, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the new tokens
    scale: float,
    num_splits: int | None = None,  # None: chosen from the shapes
    query_len: int = 1,  # new tokens per sequence, all in the cache already
    split_counters: torch.Tensor | None = None,  # int32 zeros, >= tokens x KV heads: one kernel (see above)
    rope: DecodeRope | None = None,  # q raw: the kernel rotates it and writes the new keys and values
) -> torch.Tensor:
    """The new tokens of each sequence (one, or query_len each) attend causally to its cached context.

    split_counters: the last split of each (token, KV head) combines the partial outputs, no second
    kernel; it resets its counter, so the buffer stays zero between calls (and graph replays).
    rope: the new tokens' rotary and their keys and values into the cache, in this kernel."""
    group, head_dim, block_size, num_kv_heads = _check_shapes(q, k_cache, v_cache)
    if rope is not None:
        rope.check(q, num_kv_heads, query_len)
    batch, num_heads = q.shape[0], q.shape[1]  # batch: query tokens, one program row each
    if query_len < 1 or batch != seq_lens.shape[0] * query_len:
        raise ValueError(f"q holds {batch} tokens, not query_len={query_len} for each of {seq_lens.shape[0]} sequences")
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    preload = _DECODE_PRELOAD and _DECODE_EARLY_READS and rope is not None and batch <= PDL_MAX_ROWS
    block_n = _DECODE_PRELOAD_BLOCK_N if preload else _DECODE_BLOCK_N
    if num_splits is None:
        max_seq_len = block_tables.shape[1] * block_size  # an upper bound, from shapes only
        num_splits = decode_num_splits(batch, num_kv_heads, max_seq_len, _num_sms(q.device), min_split_tokens=block_n)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    combine = num_splits > 1 and split_counters is not None
    if combine and split_counters.numel() < batch * num_kv_heads:
        raise ValueError(f"split_counters holds {split_counters.numel()}, not the {batch * num_kv_heads} this call needs")
    if num_splits > 1:
        mid_o = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out  # unused by the kernel
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        mid_o,
        mid_lse,
        scale * _LOG2E,
        num_heads,
        *_strides(q, k_cache, v_cache, block_tables, out),
        GROUP=group,
        GROUP_M=max(_DECODE_MIN_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        QUERY_LEN=query_len,
        DOT_PRECISION=_dot_precision(q.dtype),
        count_ptr=split_counters if combine else None,
        SPLITS_POW2=triton.next_power_of_2(num_splits),
        EARLY_READS=_DECODE_EARLY_READS,
        PRELOAD=preload,
        PREFETCH_TOKENS=_DECODE_PREFETCH_TOKENS,
        num_warps=4 if block_n <= 128 else 8,
        num_stages=3 if block_n <= 128 else 1,  # the loop's copies in flight must fit shared memory
        **launch_options(q.device, batch),
        **(rope.kernel_args() if rope is not None else {}),
    )
    if num_splits > 1 and not combine:
        _decode_reduce_kernel[(batch, num_heads)](
            mid_o,
            mid_lse,
            out,
            num_heads,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            SPLITS_POW2=triton.next_power_of_2(num_splits),
            num_warps=4,
            **launch_options(q.device, batch),
        )
    return out


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D], the new tokens of B sequences, flattened
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context after this step, new tokens last
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,  # [T, H, D] contiguous, to write into; default: a new tensor
) -> torch.Tensor:
    """New tokens attend causally to the cached prefix and to each other, all read from the cache."""
    group, head_dim, block_size, num_kv_heads = _check_shapes(q, k_cache, v_cache)
    num_seqs = seq_lens.shape[0]
    if q.stride(2) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(q.shape)} tensor, got {tuple(out.shape)}")
    if num_seqs == 0 or max_query_len == 0:
        return out
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, _PREFILL_BLOCK_M // group_pad)
    block_q = min(block_q, max(16, triton.next_power_of_2(max_query_len)))  # short queries: smaller tiles
    if block_q * group_pad < 16:
        block_q = 16 // group_pad  # tl.dot needs M >= 16
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        scale * _LOG2E,
        *_strides(q, k_cache, v_cache, block_tables, out),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=_PREFILL_BLOCK_N,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=8 if block_q * group_pad * head_dim >= 128 * 128 else 4,
        num_stages=2,
    )
    return out


__all__ = ["DecodeRope", "decode_num_splits", "paged_decode_attention", "paged_prefill_attention"]
