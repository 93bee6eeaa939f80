"""The inputs of a chained speculative step as one Triton kernel (CUDA; tested under the interpreter).

`advance_inputs` (engine/spec/chain.py) in torch is the reference (and the CPU path): some twenty small
kernels, 0.05 ms of a 0.45 ms step at batch 1 on an H200. Here one program per row
reads the row's verdict and its previous inputs, then writes every input of the
draft's passes and the verify pass.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _chain_advance_kernel(
    verdict_ptr, drafts_ptr, num_drafts_ptr,  # the verify pass's verdict and proposals of the step before
    last_ptr, v_seq_lens_ptr, tables_ptr, v_pos_ptr, v_slots_ptr,  # the verify pass's inputs, updated
    d_ids0_ptr, d_pos0_ptr, d_slots0_ptr, d_seq_lens0_ptr,  # the draft's catch-up: two tokens a row
    d_pos_ptr, d_slots_ptr, d_seq_lens_ptr, d_tables_ptr,  # the draft's passes [K - 1, B]; its block tables
    B, WIDTH,
    K: tl.constexpr, BLOCK_SIZE: tl.constexpr, Q_BLOCK: tl.constexpr, W_BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    row_verdict = verdict_ptr + r * (2 * K + 2)
    accepted = tl.load(row_verdict)
    active = tl.load(num_drafts_ptr + r) > 0
    n_before = tl.load(v_seq_lens_ptr + r).to(tl.int64) - K
    bonus = tl.load(row_verdict + 1 + accepted)
    last_accepted = tl.load(drafts_ptr + r * K + tl.maximum(accepted - 1, 0))
    before = tl.where(accepted > 0, last_accepted, tl.load(last_ptr + r))
    # Padding rows stay a two-token context in the null block (their table rows are all 0).
    n = tl.where(active, n_before + accepted + 1, 2)
    table = tables_ptr + r * WIDTH
    tl.debug_barrier()  # every load of this row's old inputs before any store over them

    # The target: its last known token at n - 1, the K proposals after it.
    j = tl.arange(0, Q_BLOCK)
    in_q = j < K + 1
    pos = n - 1 + j
    block = tl.load(table + pos // BLOCK_SIZE, mask=in_q, other=0).to(tl.int64)
    tl.store(v_pos_ptr + r * (K + 1) + j, pos, mask=in_q)
    tl.store(v_slots_ptr + r * (K + 1) + j, block * BLOCK_SIZE + pos % BLOCK_SIZE, mask=in_q)
    tl.store(last_ptr + r, bonus)
    tl.store(v_seq_lens_ptr + r, (n + K).to(tl.int32))

    # The draft: catch-up on tokens n - 2 (`before`) and n - 1 (`bonus`), then pass i feeds
    # proposal i - 1 at n - 1 + i (the positions j = 1 .. K - 1 of the verify row).
    two = tl.arange(0, 2)
    pos0 = n - 2 + two
    block0 = tl.load(table + pos0 // BLOCK_SIZE).to(tl.int64)
    tl.store(d_ids0_ptr + 2 * r + two, tl.where(two == 0, before, bonus))
    tl.store(d_pos0_ptr + 2 * r + two, pos0)
    tl.store(d_slots0_ptr + 2 * r + two, block0 * BLOCK_SIZE + pos0 % BLOCK_SIZE)
    tl.store(d_seq_lens0_ptr + r, n.to(tl.int32))
    in_passes = (j >= 1) & (j < K)
    at = (j - 1) * B + r
    tl.store(d_pos_ptr + at, pos, mask=in_passes)
    tl.store(d_slots_ptr + at, block * BLOCK_SIZE + pos % BLOCK_SIZE, mask=in_passes)
    tl.store(d_seq_lens_ptr + at, (pos + 1).to(tl.int32), mask=in_passes)
    for start in range(0, WIDTH, W_BLOCK):
        w = start + tl.arange(0, W_BLOCK)
        tl.store(d_tables_ptr + r * WIDTH + w, tl.load(table + w, mask=w < WIDTH), mask=w < WIDTH)


def advance_chain_inputs(vbufs, dbufs, k: int, block_size: int) -> None:
    """What chain.advance_inputs computes, in one launch (the buffers of engine/spec/target_pass.py and draft.py)."""
    b, width = vbufs.b, vbufs.tables.shape[1]
    _chain_advance_kernel[(b,)](
        vbufs.verdict, vbufs.drafts, vbufs.num_drafts,
        vbufs.last, vbufs.seq_lens, vbufs.tables, vbufs.positions, vbufs.slots,
        dbufs.ids0, dbufs.pos0, dbufs.slots0, dbufs.seq_lens0,
        dbufs.pos, dbufs.slots, dbufs.seq_lens, dbufs.tables,
        b, width,
        K=k, BLOCK_SIZE=block_size, Q_BLOCK=triton.next_power_of_2(k + 1), W_BLOCK=min(triton.next_power_of_2(width), 256),
    )
