"""CUDA graphs for decode steps, one per batch-size bucket.

A decode step of a small model is hundreds of short kernels; replaying a
captured graph launches them all at once. Inputs are copied into static
buffers; rows past the real batch point at the null block (id 0), so they
compute garbage nobody reads and write nowhere that matters.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.model.llama import LlamaForCausalLM


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 256, 16)) + list(range(256, 1025, 64))
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, max_num_seqs: int, max_blocks: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = batch_buckets(max_num_seqs)
        dev = kv_cache.device
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        # The decode attention's arrival counters (AttentionMetadata.split_counters): zero between
        # replays, each layer's kernel leaves them so for the next.
        self.split_counters = torch.zeros(n * kv_cache.shape[-2], dtype=torch.int32, device=dev)
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
        return self.logits[bucket][:b]
