"""Runs one scheduled step through the model: batch tensors in, last-position logits out.

Decode-only steps on CUDA replay a CUDA graph captured for the smallest
batch-size bucket that fits, which removes the per-layer launch overhead that
dominates small decode batches. Steps with prompt tokens replay graphs of the
pieces between attention calls (engine/mixed_graphs.py), attention launched
between them.

With speculation, `execute_spec` also feeds each speculating sequence's
proposals after its known tokens and returns the logits at the last known
token and at every proposal. A batch of decodes runs as one fixed-shape
pass (engine/spec/target_pass.py: a CUDA graph per bucket on the GPU); a
step that also holds prompt chunks runs eagerly, proposals included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.cuda_graphs import DecodeGraphs, HostDecodeInputs
from engine.kv_cache.block_table import BlockTable
from engine.mixed_graphs import MIXED_GRAPH_MAX_TOKENS, MixedStepGraphs
from engine.model.llama import LlamaForCausalLM
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.spec.proposer import Proposals
from engine.spec.target_pass import SPEC_GRAPH_MAX_BATCH, TargetVerifyPass, VerifyPassOutput


@dataclass
class DeviceTokens:
    """Tokens the step in flight sampled, still on the device (async scheduling): the next
    input of each of its sequences, which the host has not read back yet."""

    token_ids: torch.Tensor  # [N] int64
    row_of: dict[Sequence, int]  # a sequence -> its row in token_ids


@dataclass
class HostInputs:
    """A step's inputs as numpy arrays, before any of them reaches the device."""

    ids: list[int]  # the tokens fed, a 0 where the token is still on the device
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64
    logits_indices: np.ndarray  # [N] rows whose next token is sampled
    spec_indices: np.ndarray | None  # [S, k + 1]
    gather: tuple[np.ndarray, np.ndarray] | None  # (rows of ids, rows of the pending tokens) or None
    query_start: np.ndarray  # [B + 1] int64
    query_lens: np.ndarray  # [B] int64
    seq_lens: np.ndarray  # [B] int64
    table: np.ndarray  # [B, width] int32

    @property
    def decode_only(self) -> bool:
        return bool(self.query_lens.max() == 1)


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
        block_table: BlockTable,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        use_cuda_graphs: bool,
        num_speculative_tokens: int = 0,
        max_num_batched_tokens: int = 0,  # > 0 (and CUDA graphs): steps with prompt tokens up to this many too
        fuse_speculative: bool = False,  # the verify pass's graphs with the fused norm-linear layers
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_table = block_table  # the allocator's: the rows of the sequences' block ids
        self.block_size = block_size
        # Speculating sequences hold blocks for their proposals too, up to k past the context.
        self.max_blocks_per_seq = -(-(max_model_len + num_speculative_tokens) // block_size)
        self.device = kv_cache.device
        self.graphs: DecodeGraphs | None = None
        if use_cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model, kv_cache, max_num_seqs, self.max_blocks_per_seq)
            self.graphs.capture()
        self.mixed: MixedStepGraphs | None = None
        if use_cuda_graphs and self.device.type == "cuda" and max_num_batched_tokens > 0:
            self.mixed = MixedStepGraphs(model, kv_cache, min(max_num_batched_tokens, MIXED_GRAPH_MAX_TOKENS))
        self.verify_pass: TargetVerifyPass | None = None
        if num_speculative_tokens:
            graph_batch = min(max_num_seqs, SPEC_GRAPH_MAX_BATCH) if use_cuda_graphs else 0
            with model.fused_norm_linear(fuse_speculative):  # read while its graphs are captured
                self.verify_pass = TargetVerifyPass(
                    model, kv_cache, block_size, num_speculative_tokens, self.max_blocks_per_seq, graph_batch
                )

    def prepare(
        self,
        sched: SchedulerOutput,
        proposals: dict[int, list[int]] | None = None,
        k: int = 0,
        pending: DeviceTokens | None = None,
    ) -> StepInputs:
        """Batch tensors; `proposals` (scheduled index -> tokens) are fed after those items' known tokens;
        a sequence with a token in flight is fed that token from `pending`, on the device.

        Per sequence only scalars are read in Python; positions, slots and the block table are
        built with whole-batch numpy ops, and everything reaches the device in two copies.
        """
        return self._to_device(self._host_inputs(sched, proposals, k, pending), pending)

    def _host_inputs(
        self, sched: SchedulerOutput, proposals: dict[int, list[int]] | None, k: int, pending: DeviceTokens | None
    ) -> HostInputs:
        items = sched.scheduled
        seqs = [item.seq for item in items]
        n = len(items)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, n)
        num_new = np.fromiter((item.num_new_tokens for item in items), np.int64, n)
        num_extra = np.zeros(n, np.int64)
        for i, extra in (proposals or {}).items():
            num_extra[i] = len(extra)
        query_lens = num_new + num_extra
        query_start = np.zeros(n + 1, np.int64)
        np.cumsum(query_lens, out=query_start[1:])
        seq_lens = starts + query_lens
        if pending is None:
            ids, gather = self._input_ids(sched, proposals, bool(query_lens.max() == 1)), None
        else:
            ids, gather = self._input_ids_pending(sched, pending, query_start)
        # Token t of row b sits at position starts[b] + (t - query_start[b]).
        positions = np.arange(query_start[-1]) + np.repeat(starts - query_start[:-1], query_lens)
        rows = np.fromiter((s.table_row for s in seqs), np.int64, n)
        width = max(len(s.blocks) for s in seqs)
        table = self.block_table.gather(rows, width)
        bs = self.block_size
        token_rows = np.repeat(np.arange(n), query_lens)
        slots = table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        num_tokens = np.fromiter((s.num_tokens for s in seqs), np.int64, n)
        sampled = (starts + num_new == num_tokens) & (num_extra == 0)
        logits_indices = query_start[1:][sampled] - 1
        spec_indices = None
        if proposals:
            # The last known token and each proposal, padded to k + 1 rows (pads are never read).
            spec = num_extra > 0
            first = query_start[1:][spec] - num_extra[spec] - 1
            spec_indices = first[:, None] + np.minimum(np.arange(k + 1), num_extra[spec][:, None])
        return HostInputs(ids, positions, slots, logits_indices, spec_indices, gather, query_start, query_lens, seq_lens, table)

    def _to_device(self, host: HostInputs, pending: DeviceTokens | None) -> StepInputs:
        i64, i32 = self._upload(
            [host.ids, host.positions, host.slots, host.logits_indices, host.spec_indices, *(host.gather or (None, None))],
            [host.query_start.astype(np.int32), host.seq_lens, host.table],
        )
        ids_d, positions_d, slots_d, logits_d, spec_d, dst_d, src_d = i64
        if host.gather is not None:
            # Stream order makes this wait for the step that sampled them; the host does not.
            ids_d.index_copy_(0, dst_d, pending.token_ids.index_select(0, src_d))
        query_start_d, seq_lens_d, table_d = i32
        meta = AttentionMetadata(
            slot_mapping=slots_d,
            query_start_loc=query_start_d,
            seq_lens=seq_lens_d,
            block_tables=table_d.view(*host.table.shape),
            max_query_len=int(host.query_lens.max()),
            max_seq_len=int(host.seq_lens.max()),
            query_lens_cpu=host.query_lens.tolist(),
            seq_lens_cpu=host.seq_lens.tolist(),
        )
        return StepInputs(ids_d, positions_d, meta, logits_d, len(host.logits_indices), spec_d)

    @staticmethod
    def _input_ids(sched: SchedulerOutput, proposals: dict[int, list[int]] | None, decode_only: bool) -> list[int]:
        """The tokens each row feeds: its uncomputed known tokens, then its proposals."""
        if decode_only and not proposals:
            return [item.seq.token_ids[item.seq.num_computed_tokens] for item in sched.scheduled]
        ids: list[int] = []
        for i, item in enumerate(sched.scheduled):
            start = item.seq.num_computed_tokens
            ids.extend(item.seq.token_ids[start : start + item.num_new_tokens])
            if proposals and i in proposals:
                ids.extend(proposals[i])
        return ids

    @staticmethod
    def _input_ids_pending(
        sched: SchedulerOutput, pending: DeviceTokens, query_start: np.ndarray
    ) -> tuple[list[int], tuple[np.ndarray, np.ndarray] | None]:
        """Host-known input tokens (a 0 where the token is still on the device), and where those
        go: (positions in the input, rows of pending.token_ids), or None if no row has one."""
        ids: list[int] = []
        rows: list[int] = []
        src: list[int] = []
        row_of = pending.row_of
        for i, item in enumerate(sched.scheduled):
            seq = item.seq
            if seq.num_pending_tokens:
                # All its known tokens are computed (it was sampled): the pending one is its only input.
                rows.append(i)
                src.append(row_of[seq])
                ids.append(0)
            else:
                start = seq.num_computed_tokens
                ids.extend(seq.token_ids[start : start + item.num_new_tokens])
        if not rows:
            return ids, None
        return ids, (query_start[rows], np.array(src, np.int64))

    def _upload(self, int64s: list, int32s: list) -> tuple[list, list]:
        """Device tensors of the given arrays (None stays None), in one copy per dtype.

        On CUDA the arrays go through pinned memory: a copy from pageable memory may wait
        for the work already queued on the device (the staging buffer is small, and the block
        table alone is tens of KiB at batch 256), which would undo async scheduling's overlap.
        The pinned buffer is held by torch's host allocator until its copy is done.
        """
        out = []
        pin = self.device.type == "cuda"
        for arrays, dtype in ((int64s, np.int64), (int32s, np.int32)):
            parts = [np.asarray(a, dtype=dtype).reshape(-1) for a in arrays if a is not None]
            # Every piece starts 16-byte aligned: Triton specializes a kernel on whether each
            # pointer is, so offsets that move with the batch would compile new variants mid-serving.
            per_16 = 16 // np.dtype(dtype).itemsize
            padded = [-(-max(len(p), 1) // per_16) * per_16 for p in parts]
            host = torch.zeros(sum(padded), dtype=torch.from_numpy(parts[0][:0]).dtype)
            for piece, part in zip(host.split(padded), parts):
                piece[: len(part)] = torch.from_numpy(part)
            flat = (host.pin_memory() if pin else host).to(self.device, non_blocking=True)
            pieces = iter(piece[:len(part)] for piece, part in zip(flat.split(padded), parts))
            out.append([None if a is None else next(pieces) for a in arrays])
        return out[0], out[1]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, pending: DeviceTokens | None = None) -> torch.Tensor | None:
        """Logits [N, vocab] (fp32) for the sequences whose next token is due; None if none is.

        `pending`: the tokens of the step still in flight (async scheduling), fed on the device.
        """
        host = self._host_inputs(sched, None, 0, pending)
        n = len(host.seq_lens)
        if self.graphs is not None and host.decode_only and len(host.logits_indices) == n and self.graphs.fits(n):
            # Every row decodes one token and is sampled: the graph's inputs go up in one copy.
            gather = host.gather or (None, None)
            staged = HostDecodeInputs(np.asarray(host.ids, np.int64), host.positions, host.slots, host.seq_lens,
                                      host.table, *gather)
            return self.graphs.run_staged(staged, None if pending is None else pending.token_ids)
        inputs = self._to_device(host, pending)
        hidden = self._hidden(inputs)
        if inputs.num_sampled == 0:  # only partial prompt chunks: the cache is filled, no logits needed
            return None
        return self.model.compute_logits(hidden[inputs.logits_indices])

    @torch.inference_mode()
    def decode_more(
        self, seqs: list[Sequence], tokens: torch.Tensor, steps: np.ndarray, sample: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """The decode passes after a launched step (EngineConfig.num_scheduler_steps): pass j (from 1)
        feeds each sequence the token pass j - 1 sampled, on the device, and `sample` turns its logits
        into the next tokens. `tokens` [N]: the step's sampled tokens, row i sequence i's; steps[i]:
        how many tokens sequence i samples in all (>= 1), its slots allocated. Every known token of
        each sequence is computed. A row past its steps holds its last real position, reads its own
        context and writes to the null block, so its garbage touches nothing.
        """
        n = len(seqs)
        base = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, n)  # where pass 1 feeds
        table = self.block_table.gather(np.fromiter((s.table_row for s in seqs), np.int64, n), max(len(s.blocks) for s in seqs))
        rows = np.arange(n)
        bs = self.block_size
        for j in range(1, int(steps.max())):
            live = steps > j
            positions = base + np.minimum(j, steps - 1) - 1
            slots = np.where(live, table[rows, positions // bs].astype(np.int64) * bs + positions % bs, 0)
            tokens = sample(self._decode_pass(positions, slots, table, tokens))

    def _decode_pass(self, positions: np.ndarray, slots: np.ndarray, table: np.ndarray, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] of one decode token per row, row i fed tokens[i] at positions[i]."""
        n = len(positions)
        rows = np.arange(n)
        seq_lens = positions + 1
        if self.graphs is not None and self.graphs.fits(n):
            staged = HostDecodeInputs(np.zeros(n, np.int64), positions, slots, seq_lens, table, rows, rows)
            return self.graphs.run_staged(staged, tokens)
        ones = np.ones(n, np.int64)
        host = HostInputs(
            [0] * n, positions, slots, rows, None, (rows, rows), np.arange(n + 1), ones, seq_lens, table
        )
        inputs = self._to_device(host, DeviceTokens(tokens, {}))
        return self.model.compute_logits(self._hidden(inputs))

    def _hidden(self, inputs: StepInputs) -> torch.Tensor:
        """The forward pass of a step that no decode graph runs: graph pieces where they fit, else eager."""
        if self.mixed is not None and not inputs.meta.is_decode_only and self.mixed.fits(inputs.input_ids.shape[0]):
            return self.mixed.run(inputs.input_ids, inputs.positions, inputs.meta)
        return self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)

    @torch.inference_mode()
    def execute_spec(
        self, sched: SchedulerOutput, rows: list[int], proposals: Proposals
    ) -> tuple[torch.Tensor | None, VerifyPassOutput]:
        """(logits [N, vocab] of the other sequences whose next token is due, or None;
        the verify pass of the speculating ones: its row i is sched.scheduled[rows[i]], which proposed
        proposals row i).
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
            verified = self.verify_pass.run([it.seq for it in items], drafts, num_drafts)
            if len(rows) == n:
                return None, verified
            spec = set(rows)
            plain = torch.tensor([i for i in range(n) if i not in spec], dtype=torch.int64).to(dev, non_blocking=True)
            logits, verdict = verified.logits, verified.greedy_verdict
            picked = VerifyPassOutput(logits.index_select(0, rows_dev), verdict.index_select(0, rows_dev))
            return logits[plain, 0], picked
        inputs = self.prepare(sched, dict(zip(rows, proposals.host_token_ids())), k)
        hidden = self._hidden(inputs)
        logits = self.model.compute_logits(hidden[torch.cat([inputs.logits_indices, inputs.spec_indices])])
        m = inputs.num_sampled
        return (logits[:m] if m else None), VerifyPassOutput(logits[m:].view(len(rows), k + 1, -1), None)
