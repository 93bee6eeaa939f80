"""Runs one scheduled step through the model: batch tensors in, last-position logits out.

Decode-only steps on CUDA replay a CUDA graph captured for the smallest
batch-size bucket that fits, which removes the per-layer launch overhead that
dominates small decode batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.cuda_graphs import DecodeGraphs
from engine.model.llama import LlamaForCausalLM
from engine.scheduler import SchedulerOutput


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the step whose next token is sampled
    num_sampled: int


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        use_cuda_graphs: bool,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.device = kv_cache.device
        self.graphs: DecodeGraphs | None = None
        if use_cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model, kv_cache, max_num_seqs, self.max_blocks_per_seq)
            self.graphs.capture()

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        logits_indices: list[int] = []
        tables: list[list[int]] = []
        bs = self.block_size
        for item in sched.scheduled:
            seq = item.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            block_ids = seq.block_ids
            tables.append(block_ids)
            slots.extend(block_ids[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + item.num_new_tokens)
            seq_lens.append(end)
            query_lens.append(item.num_new_tokens)
            if item.completes_sequence:
                logits_indices.append(query_start[-1] - 1)
        width = max(len(t) for t in tables)
        table = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device

        def to_dev(values: list, dtype: torch.dtype) -> torch.Tensor:
            # Small pageable copies: pinning a fresh buffer each step costs more than it saves.
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=to_dev(slots, torch.int64),
            query_start_loc=to_dev(query_start, torch.int32),
            seq_lens=to_dev(seq_lens, torch.int32),
            block_tables=to_dev(table, torch.int32),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(
            to_dev(ids, torch.int64), to_dev(positions, torch.int64), meta, to_dev(logits_indices, torch.int64),
            len(logits_indices),
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> torch.Tensor | None:
        """Logits [N, vocab] (fp32) for the sequences whose next token is due; None if none is."""
        inputs = self.prepare(sched)
        if inputs.num_sampled == 0:
            # Only partial prompt chunks: fill the cache, skip the vocabulary projection.
            self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
            return None
        if self.graphs is not None and inputs.meta.is_decode_only and self.graphs.fits(inputs.meta.num_seqs):
            return self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
        return self.model.compute_logits(hidden[inputs.logits_indices])
