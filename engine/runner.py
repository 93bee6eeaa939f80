"""Runs one scheduled step through the model: batch tensors in, last-position logits out.

Decode-only steps on CUDA replay a CUDA graph captured for the smallest
batch-size bucket that fits, which removes the per-layer launch overhead that
dominates small decode batches.

With speculation, `execute_spec` also feeds each speculating sequence's
proposals after its known tokens and returns the logits at the last known
token and at every proposal. A batch of decodes runs as one fixed-shape
pass (engine/spec/target_pass.py: a CUDA graph per bucket on the GPU); a
step that also holds prompt chunks runs eagerly, proposals included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.cuda_graphs import DecodeGraphs
from engine.model.llama import LlamaForCausalLM
from engine.scheduler import SchedulerOutput
from engine.spec.proposer import Proposals
from engine.spec.target_pass import SPEC_GRAPH_MAX_BATCH, TargetVerifyPass


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the step whose next token is sampled
    num_sampled: int
    spec_indices: torch.Tensor | None = None  # [S * (k + 1)] rows of the last known token and the proposals


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        use_cuda_graphs: bool,
        num_speculative_tokens: int = 0,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        # Speculating sequences hold blocks for their proposals too, up to k past the context.
        self.max_blocks_per_seq = -(-(max_model_len + num_speculative_tokens) // block_size)
        self.device = kv_cache.device
        self.graphs: DecodeGraphs | None = None
        if use_cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model, kv_cache, max_num_seqs, self.max_blocks_per_seq)
            self.graphs.capture()
        self.verify_pass: TargetVerifyPass | None = None
        if num_speculative_tokens:
            graph_batch = min(max_num_seqs, SPEC_GRAPH_MAX_BATCH) if use_cuda_graphs else 0
            self.verify_pass = TargetVerifyPass(
                model, kv_cache, block_size, num_speculative_tokens, self.max_blocks_per_seq, graph_batch
            )

    def prepare(self, sched: SchedulerOutput, proposals: dict[int, list[int]] | None = None, k: int = 0) -> StepInputs:
        """Batch tensors; `proposals` (scheduled index -> tokens) are fed after those items' known tokens."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        logits_indices: list[int] = []
        spec_indices: list[int] = []
        tables: list[list[int]] = []
        bs = self.block_size
        for i, item in enumerate(sched.scheduled):
            seq = item.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
            ids.extend(seq.token_ids[start:end])
            extra = proposals.get(i, []) if proposals else []
            ids.extend(extra)
            positions.extend(range(start, end + len(extra)))
            block_ids = seq.block_ids
            tables.append(block_ids)
            slots.extend(block_ids[p // bs] * bs + p % bs for p in range(start, end + len(extra)))
            query_start.append(query_start[-1] + item.num_new_tokens + len(extra))
            seq_lens.append(end + len(extra))
            query_lens.append(item.num_new_tokens + len(extra))
            if extra:
                # The last known token and each proposal, padded to k + 1 rows (pads are never read).
                rows = list(range(query_start[-1] - len(extra) - 1, query_start[-1]))
                spec_indices.extend(rows + [rows[-1]] * (k + 1 - len(rows)))
            elif item.completes_sequence:
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
            len(logits_indices), to_dev(spec_indices, torch.int64) if spec_indices else None,
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

    @torch.inference_mode()
    def execute_spec(
        self, sched: SchedulerOutput, rows: list[int], proposals: Proposals
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits [N, vocab] of the other sequences whose next token is due, or None;
        logits [S, k + 1, vocab] of the speculating ones: sched.scheduled[rows[i]] proposed proposals row i).
        """
        assert self.verify_pass is not None
        k = self.verify_pass.k
        items = sched.scheduled
        dev = self.device
        if all(it.num_new_tokens == 1 and it.completes_sequence for it in items) and self.verify_pass.fits(len(items)):
            n = len(items)
            if len(rows) == n:
                drafts, num_drafts = proposals.token_ids, proposals.num_tokens
            else:
                rows_dev = torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)
                drafts = torch.zeros(n, k, dtype=torch.int64, device=dev).index_copy_(0, rows_dev, proposals.token_ids)
                num_drafts = [0] * n
                for r, i in enumerate(rows):
                    num_drafts[i] = proposals.num_tokens[r]
            logits = self.verify_pass.run([it.seq for it in items], drafts, num_drafts)
            if len(rows) == n:
                return None, logits
            spec = set(rows)
            plain = torch.tensor([i for i in range(n) if i not in spec], dtype=torch.int64).to(dev, non_blocking=True)
            return logits[plain, 0], logits.index_select(0, rows_dev)
        inputs = self.prepare(sched, dict(zip(rows, proposals.host_token_ids())), k)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
        logits = self.model.compute_logits(hidden[torch.cat([inputs.logits_indices, inputs.spec_indices])])
        m = inputs.num_sampled
        return (logits[:m] if m else None), logits[m:].view(len(rows), k + 1, -1)
