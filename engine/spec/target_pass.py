"""The target's verify pass for a batch of decoding sequences, in one fixed shape.

Every row feeds k + 1 tokens: its last known token and up to k proposals.
Rows with fewer proposals (or none) are padded with idle tokens that write
their K/V to the null block and whose outputs nobody reads; each row's
context is padded to seq_len = num_tokens + k so that its real tokens sit
at their true positions (attention places new token j of a row at
seq_len - (k + 1) + j and masks causally, so no real token sees a pad).
The fixed shape makes the pass a CUDA graph per batch bucket on the GPU;
on the CPU the same code runs eagerly.

The pass also gives the greedy verdict (engine/spec/verify.py's rule for
rows at temperature 0) in the same graph, laid out as the engine reads it:
[num_accepted, the target's k + 1 tokens, the k proposals] per row. A
greedy step then reads one small tensor back and launches nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.cuda_graphs import batch_buckets
from engine.model.llama import LlamaForCausalLM
from engine.sequence import Sequence
from engine.spec.verify import accept_greedy

# Speculative steps of larger batches run eagerly: speculation pays most at small batches, and the
# graphs' fixed buffers (logits and draft distributions over the vocabulary) grow with the bucket.
SPEC_GRAPH_MAX_BATCH = 64


class VerifyBuffers:
    def __init__(self, b: int, k: int, width: int, device: torch.device) -> None:
        self.b = b
        q = k + 1
        self.i64 = torch.zeros(2 * b + 2 * b * q, dtype=torch.int64, device=device)
        self.last = self.i64[:b]
        self.num_drafts = self.i64[b : 2 * b]
        self.positions = self.i64[2 * b : 2 * b + b * q]
        self.slots = self.i64[2 * b + b * q :]
        self.i32 = torch.zeros(b + b * width, dtype=torch.int32, device=device)
        self.seq_lens = self.i32[:b]
        self.tables = self.i32[b:].view(b, width)
        self.drafts = torch.zeros(b, k, dtype=torch.int64, device=device)
        self.query_start = torch.arange(0, b * q + 1, q, dtype=torch.int32, device=device)
        self.logits: torch.Tensor | None = None
        self.verdict: torch.Tensor | None = None


@dataclass
class VerifyPassOutput:
    logits: torch.Tensor  # [B, k + 1, vocab] fp32: at each row's last known token and its proposals
    # [B, 2k + 2] int64: num_accepted, the k + 1 tokens a greedy row emits from, its k proposals.
    # None where the pass ran as an ordinary step (the verdict is then computed from the logits).
    greedy_verdict: torch.Tensor | None


class TargetVerifyPass:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        num_speculative_tokens: int,
        max_blocks_per_seq: int,
        max_graph_batch: int,  # 0: no CUDA graphs
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.k = num_speculative_tokens
        self.width = max_blocks_per_seq
        self.device = kv_cache.device
        self.buckets: list[int] = []
        self._buffers: dict[int, VerifyBuffers] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if max_graph_batch > 0 and self.device.type == "cuda":
            self.buckets = batch_buckets(max_graph_batch)
            self._capture()

    def fits(self, batch: int) -> bool:
        """False when the batch is larger than the largest graph (it then runs as an ordinary eager step)."""
        return not self.buckets or batch <= self.buckets[-1]

    def bucket(self, batch: int) -> int:
        """The rows a pass of `batch` sequences runs with: its graph's bucket, or exactly `batch`."""
        return next((b for b in self.buckets if b >= batch), batch)

    def buffers(self, b: int) -> VerifyBuffers:
        bufs = self._buffers.get(b)
        if bufs is None:
            bufs = self._buffers[b] = VerifyBuffers(b, self.k, self.width, self.device)
        return bufs

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], draft_ids: torch.Tensor, num_drafts: list[int]) -> VerifyPassOutput:
        """Target logits at each row's last known token and its proposals, and the greedy verdict."""
        n = len(seqs)
        b = self.bucket(n)
        bufs = self.buffers(b)
        seq_lens = self._upload(bufs, seqs, num_drafts)
        bufs.drafts[:n].copy_(draft_ids)
        self._run(bufs, seq_lens)
        return VerifyPassOutput(bufs.logits.view(b, self.k + 1, -1)[:n], bufs.verdict[:n])

    def forward_in_place(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass on bucket b's buffers as they are (their inputs filled on the device,
        engine/spec/chain.py, which captures this in its own graph): new (logits, greedy verdict)."""
        bufs = self.buffers(b)
        return self._forward(bufs, None if self.device.type == "cuda" else bufs.seq_lens.tolist())

    def _run(self, bufs: VerifyBuffers, seq_lens_cpu: list[int] | None) -> None:
        graph = self._graphs.get(bufs.b)
        if graph is not None:
            graph.replay()
        else:  # the CPU, or a bucket set by a test (padding rows run eagerly)
            bufs.logits, bufs.verdict = self._forward(bufs, seq_lens_cpu)

    def _forward(self, bufs: VerifyBuffers, seq_lens_cpu: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, q = bufs.b, self.k + 1
        ids = torch.cat([bufs.last.unsqueeze(1), bufs.drafts], dim=1).view(-1)
        meta = AttentionMetadata(
            slot_mapping=bufs.slots,
            query_start_loc=bufs.query_start,
            seq_lens=bufs.seq_lens,
            block_tables=bufs.tables,
            max_query_len=q,
            max_seq_len=self.width * self.block_size,
            query_lens_cpu=[q] * b,
            seq_lens_cpu=seq_lens_cpu if seq_lens_cpu is not None else [q] * b,
            uniform_query_len=q,
        )
        hidden = self.model(ids, bufs.positions, self.kv_cache, meta)
        logits = self.model.compute_logits(hidden)
        tokens, num_accepted = accept_greedy(bufs.drafts, bufs.num_drafts, logits.view(b, q, -1).argmax(dim=2))
        return logits, torch.cat([num_accepted.unsqueeze(1), tokens, bufs.drafts], dim=1)

    def _upload(self, bufs: VerifyBuffers, seqs: list[Sequence], num_drafts: list[int]) -> list[int]:
        b, q, bs, width = bufs.b, self.k + 1, self.block_size, self.width
        last = [0] * b
        positions = [0] * (b * q)
        slots = [0] * (b * q)
        seq_lens = [q] * b
        tables: list[int] = []
        for i, (seq, nd) in enumerate(zip(seqs, num_drafts)):
            n = seq.num_tokens
            table = seq.block_ids
            last[i] = seq.token_ids[-1]
            for j in range(nd + 1):  # the last known token at n - 1, proposal j at n - 1 + j
                p = n - 1 + j
                positions[i * q + j] = p
                slots[i * q + j] = table[p // bs] * bs + p % bs
            seq_lens[i] = n + self.k
            tables.extend(table[:width])
            tables.extend([0] * (width - min(len(table), width)))
        tables.extend([0] * ((b - len(seqs)) * width))
        drafts = list(num_drafts) + [0] * (b - len(seqs))
        bufs.i64.copy_(torch.tensor(last + drafts + positions + slots, dtype=torch.int64), non_blocking=True)
        bufs.i32.copy_(torch.tensor(seq_lens + tables, dtype=torch.int32), non_blocking=True)
        return seq_lens

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            bufs = self._buffers[b] = VerifyBuffers(b, self.k, self.width, self.device)
            bufs.seq_lens.fill_(self.k + 1)  # idle rows: a context of pads in the null block
            self._forward(bufs, None)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                bufs.logits, bufs.verdict = self._forward(bufs, None)
            self._graphs[b] = graph
        torch.cuda.synchronize()
