"""The chained step's input kernel (engine/spec/chain_kernel.py) against its torch reference, under the interpreter."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.triton_interpreter import interpreted_module  # noqa: E402

from engine.spec.chain import advance_inputs  # noqa: E402
from engine.spec.draft import DraftBuffers  # noqa: E402
from engine.spec.target_pass import VerifyBuffers  # noqa: E402

pytest.importorskip("triton")

VOCAB = 50


@pytest.fixture
def kernel():
    return interpreted_module("engine.spec.chain_kernel", "_chain_advance_kernel")


def step_before(b: int, rows: int, k: int, width: int, block_size: int, seed: int) -> tuple[VerifyBuffers, DraftBuffers]:
    """Buffers as a verify pass of `rows` real rows (the rest padding) leaves them, with a random verdict."""
    gen = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")
    vbufs, dbufs = VerifyBuffers(b, k, width, cpu), DraftBuffers(b, k, width, VOCAB, cpu)
    vbufs.seq_lens.fill_(k + 1)  # padding rows: a context of pads in the null block
    for r in range(rows):
        n = int(torch.randint(2, width * block_size - 2 * k - 2, (1,), generator=gen))
        vbufs.seq_lens[r] = n + k
        vbufs.num_drafts[r] = k
        vbufs.last[r] = int(torch.randint(VOCAB, (1,), generator=gen))
        vbufs.tables[r] = torch.randperm(width * 3, generator=gen)[:width].to(torch.int32) + 1
    vbufs.drafts.copy_(torch.randint(VOCAB, (b, k), generator=gen))
    accepted = torch.randint(0, k + 1, (b,), generator=gen) * (vbufs.num_drafts > 0)
    tokens = torch.randint(VOCAB, (b, k + 1), generator=gen)
    vbufs.verdict = torch.cat([accepted.unsqueeze(1), tokens, vbufs.drafts], dim=1)
    dbufs.i64.copy_(torch.randint(1000, dbufs.i64.shape, generator=gen))  # stale inputs, all overwritten
    dbufs.i32.copy_(torch.randint(1000, dbufs.i32.shape, generator=gen))
    return vbufs, dbufs


def clone(vbufs: VerifyBuffers, dbufs: DraftBuffers) -> tuple[VerifyBuffers, DraftBuffers]:
    v2, d2 = VerifyBuffers(vbufs.b, vbufs.drafts.shape[1], vbufs.tables.shape[1], torch.device("cpu")), DraftBuffers(
        dbufs.b, dbufs.k, dbufs.tables.shape[1], VOCAB, torch.device("cpu")
    )
    for src, dst in ((vbufs.i64, v2.i64), (vbufs.i32, v2.i32), (vbufs.drafts, v2.drafts), (dbufs.i64, d2.i64), (dbufs.i32, d2.i32)):
        dst.copy_(src)
    v2.verdict = vbufs.verdict.clone()
    return v2, d2


@pytest.mark.parametrize("b, rows, k, block_size", [(1, 1, 2, 16), (4, 3, 4, 4), (8, 8, 1, 16), (16, 5, 5, 8)])
def test_kernel_matches_the_torch_reference(kernel, b, rows, k, block_size):
    width = 12
    ref_v, ref_d = step_before(b, rows, k, width, block_size, seed=b * 10 + k)
    got_v, got_d = clone(ref_v, ref_d)
    n_before, last_before = int(ref_v.seq_lens[0]) - k, int(ref_v.last[0])
    advance_inputs(ref_v, ref_d, k, block_size)
    kernel.advance_chain_inputs(got_v, got_d, k, block_size)
    assert torch.equal(got_v.i64, ref_v.i64) and torch.equal(got_v.i32, ref_v.i32)
    assert torch.equal(got_d.i64, ref_d.i64) and torch.equal(got_d.i32, ref_d.i32)
    # The reference itself, on row 0: it now holds n = n_before + accepted + 1 tokens.
    accepted = int(ref_v.verdict[0, 0])
    n = n_before + accepted + 1
    assert int(ref_v.last[0]) == int(ref_v.verdict[0, 1 + accepted]) and int(ref_v.seq_lens[0]) == n + k
    assert ref_d.ids0[:2].tolist() == [int(ref_v.drafts[0, accepted - 1]) if accepted else last_before, int(ref_v.last[0])]
    assert ref_d.pos0[:2].tolist() == [n - 2, n - 1] and int(ref_d.seq_lens0[0]) == n
    assert ref_v.positions[: k + 1].tolist() == list(range(n - 1, n + k))
    table = ref_v.tables[0].tolist()
    assert ref_v.slots[: k + 1].tolist() == [table[p // block_size] * block_size + p % block_size for p in range(n - 1, n + k)]
    assert ref_d.pos[:, 0].tolist() == list(range(n, n + k - 1))
    assert torch.equal(ref_d.tables, ref_v.tables)
