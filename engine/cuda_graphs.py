"""CUDA graphs for decode steps, one per batch-size bucket.

A decode step of a small model is hundreds of short kernels; replaying a
captured graph launches them all at once. Inputs are copied into static
buffers; rows past the real batch write their one token to the null block
(slot 0) and read a context of that one token, so they compute garbage nobody
reads and write nowhere that matters.

`run_staged` takes the step's inputs as host arrays and puts them in place with one
host-to-device copy (and the block table's rows with a second only when they changed):
outside the graph every operation costs the GPU a few microseconds and a gap, and at
batch 1 of the 8B model in int4 the step's dozen of them took 0.12 of its 2.61 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.model.llama import LlamaForCausalLM


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 256, 16)) + list(range(256, 1025, 64))
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


@dataclass
class HostDecodeInputs:
    """A decode step's inputs as the host has them (run_staged)."""

    input_ids: np.ndarray  # [B] int64; a 0 where the token is still on the device
    positions: np.ndarray  # [B] int64
    slot_mapping: np.ndarray  # [B] int64
    seq_lens: np.ndarray  # [B] int64
    block_tables: np.ndarray  # [B, width] int32
    # Rows of input_ids to fill from the device tokens of the step in flight, and their rows there.
    pending_rows: np.ndarray | None = None  # [P] int64
    pending_src: np.ndarray | None = None  # [P] int64


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, max_num_seqs: int, max_blocks: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = batch_buckets(max_num_seqs)
        dev = kv_cache.device
        n = self.buckets[-1]
        # The inputs that change every step share one buffer, so run_staged uploads them in one copy:
        # int64 regions of r words (ids, positions, slots, pending rows, their sources), then int32
        # words: seq_lens (r) and the step's block table, packed [B, width]. r is even, so each
        # region starts 16-byte aligned (Triton specializes kernels on their pointers' alignment).
        r = self._region = n + n % 2
        self._staged = torch.zeros(5 * r + (r + n * max_blocks + 1) // 2, dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.slot_mapping = (self._staged[i * r : i * r + n] for i in range(3))
        self._pending_rows, self._pending_src = self._staged[3 * r : 4 * r], self._staged[4 * r : 5 * r]
        words32 = self._staged[5 * r :].view(torch.int32)
        self.seq_lens = words32[:n].fill_(1)
        self._packed_table = words32[r : r + n * max_blocks]
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        # What block_tables holds, so that run_staged copies rows only when they changed.
        self._tables_held = np.zeros((n, max_blocks), dtype=np.int32)
        # Decode attention's splits are combined by a kernel of their own: with arrival counters
        # (AttentionMetadata.split_counters, the last split combining) the 8B model's int4 decode
        # graph at batch 1 took 2.660 ms against 2.537 ms on an H100, same process and logits
        # (bench/decode_graph_ab.py, BENCHMARKS.md W3). bench.decode_graph_ab sets counters here
        # (int32 zeros, >= batch x KV heads) to time them again.
        self.split_counters: torch.Tensor | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def fits(self, batch: int) -> bool:
        return batch <= self.buckets[-1]

    def bucket_for(self, batch: int) -> int:
        """The smallest captured batch size that holds `batch` rows (which must fit)."""
        return next(s for s in self.buckets if s >= batch)

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            max_query_len=1,
            max_seq_len=self.block_tables.shape[1],
            query_lens_cpu=[1] * b,
            seq_lens_cpu=[1] * b,
            split_counters=self.split_counters,
        )

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.kv_cache, self._meta(b))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            self._forward(b)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b = meta.num_seqs
        bucket = self.bucket_for(b)
        width = meta.block_tables.shape[1]
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.block_tables[:b, :width].copy_(meta.block_tables)
        if bucket > b:  # padding rows: a one-token context in the null block
            self.slot_mapping[b:bucket].zero_()
            self.seq_lens[b:bucket].fill_(1)
            self.block_tables[b:bucket].zero_()
        self.graphs[bucket].replay()
        self._tables_held[:bucket] = -1  # unknown to the host now: run_staged copies those rows next time
        return self.logits[bucket][:b]

    def run_staged(self, inputs: HostDecodeInputs, pending_tokens: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, vocab] of a decode step given as host arrays; pending_tokens: the device tokens
        that inputs.pending_src indexes (the step in flight's), fed to rows inputs.pending_rows."""
        b = len(inputs.seq_lens)
        bucket = self.bucket_for(b)
        width = inputs.block_tables.shape[1]
        r = self._region
        host = np.zeros(5 * r + (r + b * width + 1) // 2, dtype=np.int64)
        host[:b], host[r : r + b], host[2 * r : 2 * r + b] = inputs.input_ids, inputs.positions, inputs.slot_mapping
        # Padding rows: slot 0 (the null block), a context of one token; their tables' rows are never
        # read past block 0, and whatever block id is left there is a valid one to read.
        words32 = host[5 * r :].view(np.int32)
        words32[:b], words32[b:bucket] = inputs.seq_lens, 1
        pending = 0 if inputs.pending_rows is None else len(inputs.pending_rows)
        if pending:
            host[3 * r : 3 * r + pending], host[4 * r : 4 * r + pending] = inputs.pending_rows, inputs.pending_src
        changed = not np.array_equal(self._tables_held[:b, :width], inputs.block_tables)
        if changed:
            words32[r : r + b * width] = inputs.block_tables.reshape(-1)
        else:  # the table's words are not sent
            host = host[: 5 * r + (r + 1) // 2]
        upload = torch.from_numpy(host)
        # Through pinned memory: a copy from pageable memory may wait for the work queued ahead.
        self._staged[: len(host)].copy_(upload.pin_memory() if self._staged.is_cuda else upload, non_blocking=True)
        if pending:
            # Stream order makes this wait for the step that sampled them; the host does not.
            src = pending_tokens.index_select(0, self._pending_src[:pending])
            self.input_ids.index_copy_(0, self._pending_rows[:pending], src)
        if changed:
            self.block_tables[:b, :width].copy_(self._packed_table[: b * width].view(b, width))
            self._tables_held[:b, :width] = inputs.block_tables
        self.graphs[bucket].replay()
        return self.logits[bucket][:b]
