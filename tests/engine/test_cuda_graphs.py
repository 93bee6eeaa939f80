"""engine/cuda_graphs.py: a decode step staged from host arrays gives the eager forward pass's logits.

The staging (one buffer for the inputs that change every step, the pending tokens gathered on the
device, the block table's rows copied only when they changed, padding rows) is plain tensor work,
so it runs here on the CPU; each "graph" replays the captured forward eagerly over the same static
buffers (a CUDA graph replays the kernels that the capture recorded over them). Logits agree to fp32
rounding (a bucket's padding row changes the CPU matmul's blocking); a wrong input moves them by 0.1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.cuda_graphs import DecodeGraphs, HostDecodeInputs
from engine.model.loader import load_model

BLOCK = 4
MAX_BLOCKS = 6


class EagerReplay:
    """Stands in for the captured graph of one bucket: the same forward over the same static buffers.
    (The CPU's reference attention reads the context lengths from host lists: taken from the buffer.)"""

    def __init__(self, graphs: DecodeGraphs, bucket: int) -> None:
        self.graphs, self.bucket = graphs, bucket

    def replay(self) -> None:
        g, b = self.graphs, self.bucket
        meta = dataclasses.replace(g._meta(b), seq_lens_cpu=g.seq_lens[:b].tolist())
        hidden = g.model(g.input_ids[:b], g.positions[:b], g.kv_cache, meta)
        g.logits[b].copy_(g.model.compute_logits(hidden))


def setup():
    loaded = load_model("preset:tiny-llama", "float32", "cpu", seed=0)
    arch = loaded.arch
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(arch.num_layers, 2, 24, BLOCK, arch.num_kv_heads, arch.head_dim, generator=gen)
    graphs = DecodeGraphs(loaded.model, kv, max_num_seqs=4, max_blocks=MAX_BLOCKS)
    graphs.graphs = {b: EagerReplay(graphs, b) for b in graphs.buckets}
    graphs.logits = {b: torch.empty(b, arch.vocab_size) for b in graphs.buckets}
    return loaded.model, kv, graphs


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5))


def eager_logits(model, kv, ids, positions, slots, seq_lens, table) -> torch.Tensor:
    n = len(seq_lens)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(table, dtype=torch.int32),
        max_query_len=1,
        max_seq_len=int(max(seq_lens)),
        query_lens_cpu=[1] * n,
        seq_lens_cpu=list(seq_lens),
    )
    return model.compute_logits(model(torch.tensor(ids), torch.tensor(positions), kv.clone(), meta))


def step(seq_lens, table, ids):
    """The host arrays of a decode step: each sequence's new token at position seq_len - 1."""
    table = np.array(table, dtype=np.int32)
    positions = np.array(seq_lens, dtype=np.int64) - 1
    slots = table[np.arange(len(seq_lens)), positions // BLOCK].astype(np.int64) * BLOCK + positions % BLOCK
    return np.array(ids, dtype=np.int64), positions, slots, np.array(seq_lens, dtype=np.int64), table


@torch.inference_mode()
def test_staged_steps_equal_the_eager_forward_as_tables_and_batches_change():
    model, kv, graphs = setup()
    steps = [
        step([5, 9, 2], [[1, 2, 0], [3, 4, 5], [6, 0, 0]], [11, 12, 13]),  # 3 rows: bucket 4, a padding row
        step([6, 10, 3], [[1, 2, 0], [3, 4, 5], [6, 0, 0]], [21, 22, 23]),  # same table: its rows are not sent
        step([7, 11, 4], [[1, 2, 0], [3, 4, 5], [6, 0, 0]], [31, 32, 33]),
        step([13, 5], [[3, 4, 5, 7], [8, 9, 0, 0]], [41, 42]),  # another batch, wider table
        step([6, 14], [[8, 9, 0, 0], [3, 4, 5, 7]], [51, 52]),  # the same rows swapped
    ]
    for ids, positions, slots, seq_lens, table in steps:
        want = eager_logits(model, kv, ids, positions, slots, seq_lens, table)
        got = graphs.run_staged(HostDecodeInputs(ids, positions, slots, seq_lens, table), None)
        assert same(got, want)


@torch.inference_mode()
def test_tokens_still_on_the_device_are_gathered_into_their_rows():
    model, kv, graphs = setup()
    ids, positions, slots, seq_lens, table = step([5, 9, 2], [[1, 2, 0], [3, 4, 5], [6, 0, 0]], [11, 0, 0])
    in_flight = torch.tensor([70, 71, 72, 73])  # the step in flight's tokens, on the device
    staged = HostDecodeInputs(ids, positions, slots, seq_lens, table, np.array([2, 1]), np.array([3, 0]))
    got = graphs.run_staged(staged, in_flight)
    assert same(got, eager_logits(model, kv, [11, 70, 73], positions, slots, seq_lens, table))


@torch.inference_mode()
def test_a_step_run_from_device_tensors_leaves_the_next_staged_one_correct():
    # run() copies device tensors the host has no copy of: the next staged step must send its table.
    model, kv, graphs = setup()
    a = step([5, 9], [[1, 2, 0], [3, 4, 5]], [11, 12])
    graphs.run_staged(HostDecodeInputs(*a), None)
    other = [[6, 7, 0], [8, 9, 10]]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([25, 33]), query_start_loc=torch.arange(3, dtype=torch.int32),
        seq_lens=torch.tensor([6, 10], dtype=torch.int32), block_tables=torch.tensor(other, dtype=torch.int32),
        max_query_len=1, max_seq_len=10, query_lens_cpu=[1, 1], seq_lens_cpu=[6, 10],
    )
    graphs.run(torch.tensor([1, 2]), torch.tensor([5, 9]), meta)
    b = step([5, 9], [[1, 2, 0], [3, 4, 5]], [14, 15])  # a's table again, which the device no longer holds
    want = eager_logits(model, kv, *b)
    assert same(graphs.run_staged(HostDecodeInputs(*b), None), want)
