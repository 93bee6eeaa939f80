"""A draft model that proposes k tokens per sequence over a paged KV cache of its own.

`DraftModel` is the machinery: each call catches every sequence up on the
tokens whose K/V its cache lacks (one forward pass over all of them), then
runs k - 1 single-token passes for the whole batch, drawing each proposal
on the device (argmax, or a sample from softmax(logits / temperature) for
rows at temperature > 0). The tokens go back to the host once, by whoever
reads them.

In steady state a sequence lacks only one or two tokens (the target's bonus
token, plus the last proposal when all were accepted), so the catch-up is
padded to exactly two tokens (re-feeding the token before when only one is
new) and the whole propose call, catch-up and k - 1 passes, is one CUDA
graph per batch bucket. A sequence that lacks more (a new prompt, after a
preemption) first gets the K/V of all but its last two tokens in one
prefill-like pass (graph pieces on CUDA, engine/mixed_graphs.py), and the
call goes on as a regular one.

`DraftProposer` is the co-located proposer: the draft lives on the target's
device and its cache has the target's block geometry, so it reads and
writes through each sequence's own block table (one allocator, two caches).
It tracks, per sequence, how many leading tokens its cache holds; and, per
block, which full block of tokens (by the target's chain hash) it last
computed there, so a new sequence that reuses cached prefix blocks reuses
the draft's K/V of those blocks too whenever they are the draft's own.
Positions past that count (rejected proposals) are never read: they are
overwritten before any pass attends to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata
from engine.cuda_graphs import batch_buckets
from engine.mixed_graphs import MIXED_GRAPH_MAX_TOKENS, MixedStepGraphs
from engine.model.llama import LlamaForCausalLM
from engine.sequence import Sequence
from engine.spec.proposer import Proposals, SpecRequest


class DraftBuffers:
    """Inputs and outputs of one propose call for up to `b` rows, fixed in memory.

    The integer inputs are views into two flat tensors (int64, int32) so a
    step's inputs reach the device in two copies; a CUDA graph captured for
    this bucket reads them in place.
    """

    def __init__(
        self, b: int, k: int, width: int, vocab: int, device: torch.device, shared: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        self.b, self.k = b, k
        passes = k - 1
        self.i64 = torch.zeros(6 * b + 2 * passes * b, dtype=torch.int64, device=device)
        self.i32 = torch.zeros(b + passes * b + b * width, dtype=torch.int32, device=device)
        o = 0
        self.ids0, o = self.i64[o : o + 2 * b], o + 2 * b  # catch-up: two tokens per row
        self.pos0, o = self.i64[o : o + 2 * b], o + 2 * b
        self.slots0, o = self.i64[o : o + 2 * b], o + 2 * b
        self.pos, o = self.i64[o : o + passes * b].view(passes, b), o + passes * b  # pass j feeds proposal j
        self.slots = self.i64[o : o + passes * b].view(passes, b)
        o = 0
        self.seq_lens0, o = self.i32[o : o + b], o + b
        self.seq_lens, o = self.i32[o : o + passes * b].view(passes, b), o + passes * b
        self.tables = self.i32[o:].view(b, width)
        self.qsl2 = torch.arange(0, 2 * b + 1, 2, dtype=torch.int32, device=device)
        self.qsl1 = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.temps = torch.zeros(b, dtype=torch.float32, device=device)
        self.tokens = torch.zeros(b, k, dtype=torch.int64, device=device)
        # Vocabulary-sized: the graph buckets share one pair (they never run at once).
        if shared is None:
            shared = (torch.ones(k, b, vocab, device=device), torch.zeros(b, k, vocab, device=device))
        self.noise = shared[0][:, :b]
        self.probs = shared[1][:b]


@dataclass
class _Host:
    """One call's inputs, built on the host in the layout of DraftBuffers."""

    i64: list[int]
    i32: list[int]
    seq_lens0: list[int]  # host copies for the CPU attention path
    seq_lens: list[list[int]]


class DraftModel:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,  # [layers, 2, num_blocks, block_size, KVH, D], indexed by the callers' block tables
        block_size: int,
        num_speculative_tokens: int,
        vocab_size: int,  # the target's: proposals and probabilities are over its vocabulary
        max_blocks_per_seq: int,
        max_graph_batch: int,  # 0: no CUDA graphs
        generator: torch.Generator,
        sample_top_k: int = 0,  # > 0: sample proposals from the top-k of the draft's distribution only
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.k = num_speculative_tokens
        self.vocab_size = vocab_size
        self.width = max_blocks_per_seq
        self.device = kv_cache.device
        self.generator = generator
        self.sample_top_k = sample_top_k
        self._buffers: dict[int, DraftBuffers] = {}
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.buckets: list[int] = []
        self._shared: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fill_pieces: MixedStepGraphs | None = None
        if max_graph_batch > 0 and self.device.type == "cuda":
            self.use_buckets(max_graph_batch)
            self._capture()

    def use_buckets(self, max_batch: int) -> None:
        """Pad regular calls to batch buckets and fill through graph pieces (what the CUDA graphs need;
        tests use it on the CPU too)."""
        self.buckets = batch_buckets(max_batch)
        # The pieces of the catch-up pass, as CUDA graphs (on the CPU the same pieces run eagerly).
        self._fill_pieces = MixedStepGraphs(self.model, self.kv_cache, MIXED_GRAPH_MAX_TOKENS, self.device.type == "cuda")
        b, k, v = self.buckets[-1], self.k, self.vocab_size
        self._shared = (torch.ones(k, b, v, device=self.device), torch.zeros(b, k, v, device=self.device))
        self._buffers.clear()

    # ----- the call ----------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], starts: list[int], ks: list[int]) -> Proposals:
        """Proposals for each sequence; starts[i]: leading tokens of seqs[i] already in this cache.

        Each sequence's block table must cover its tokens plus ks[i] - 1 more.
        The returned tokens and probs (rows at temperature > 0) are this model's buffers: they stay
        valid until the next call (the engine verifies them before that).
        """
        n = len(seqs)
        temps = [s.params.temperature for s in seqs]
        sample = any(t > 0 for t in temps)
        regular = all(s.num_tokens >= 2 for s in seqs)
        if regular and any(s.num_tokens - st > 2 for s, st in zip(seqs, starts)):
            starts = self._fill_to_last_two(seqs, starts)
        if regular:
            bucket = next((b for b in self.buckets if b >= n), None)
            bufs = self.buffers(bucket) if bucket is not None else self._new_buffers(n)
            host = self._host_inputs(bufs, seqs, starts, ks)
            self._upload(bufs, host, temps, seqs, sample)
            graph = self._graphs.get((bucket, sample))
            if graph is not None:
                graph.replay()
            else:
                self._forward_regular(bufs, sample, host)
        else:
            bufs = self._new_buffers(n)
            host = self._host_inputs(bufs, seqs, starts, ks)
            self._upload(bufs, host, temps, seqs, sample)
            self._forward_catch_up(bufs, seqs, starts, sample, host)
        return Proposals(bufs.tokens[:n], list(ks), bufs.probs[:n] if sample else None)

    def forward_in_place(self, bucket: int, sample: bool) -> torch.Tensor:
        """A regular call's forward passes on the bucket's buffers as they are (their inputs filled on
        the device, engine/spec/chain.py, which captures this in its own graph); returns the proposals
        of all its rows, [bucket, k]. Sampled: the distributions they were drawn from are in its probs."""
        bufs = self.buffers(bucket)
        host = None if self.device.type == "cuda" else _Host([], [], bufs.seq_lens0.tolist(), bufs.seq_lens.tolist())
        self._forward_regular(bufs, sample, host)
        return bufs.tokens

    # ----- forward passes (no host syncs: the regular path is captured as one graph) -----

    def _forward_regular(self, bufs: DraftBuffers, sample: bool, host: _Host | None) -> None:
        b = bufs.b
        meta = AttentionMetadata(
            slot_mapping=bufs.slots0,
            query_start_loc=bufs.qsl2,
            seq_lens=bufs.seq_lens0,
            block_tables=bufs.tables,
            max_query_len=2,
            max_seq_len=self.width * self.block_size,
            query_lens_cpu=[2] * b,
            seq_lens_cpu=host.seq_lens0 if host else [2] * b,
            uniform_query_len=2,
        )
        hidden = self.model(bufs.ids0, bufs.pos0, self.kv_cache, meta)
        token = self._choose(hidden[1::2], bufs, 0, sample)
        self._passes(bufs, token, sample, host)

    def _forward_catch_up(
        self, bufs: DraftBuffers, seqs: list[Sequence], starts: list[int], sample: bool, host: _Host
    ) -> None:
        """Any number of missing tokens per sequence, as one varlen prefill-like pass; then the passes.
        Only for a batch with a sequence of one token, which the regular path cannot feed two."""
        ids, positions, meta = self._varlen_pass(seqs, starts, [s.num_tokens for s in seqs], bufs.tables)
        hidden = self.model(ids, positions, self.kv_cache, meta)
        last = (meta.query_start_loc[1:] - 1).long()
        token = self._choose(hidden[last], bufs, 0, sample)
        self._passes(bufs, token, sample, host)

    def _fill_to_last_two(self, seqs: list[Sequence], starts: list[int]) -> list[int]:
        """Computes the draft's K/V of every token but each sequence's last two, in one pass; returns
        the new starts, from which the call is a regular one. On CUDA the pass replays graph pieces:
        run eagerly, it is a few hundred launches for a new prompt."""
        rows = [i for i, (seq, start) in enumerate(zip(seqs, starts)) if seq.num_tokens - 2 > start]
        picked = [seqs[i] for i in rows]
        tables = self._block_tables(picked)
        ids, positions, meta = self._varlen_pass(picked, [starts[i] for i in rows], [s.num_tokens - 2 for s in picked], tables)
        pieces = self._fill_pieces
        if pieces is not None and pieces.fits(ids.shape[0]):
            pieces.run(ids, positions, meta)
        else:
            self.model(ids, positions, self.kv_cache, meta)
        return [max(start, seq.num_tokens - 2) for seq, start in zip(seqs, starts)]

    def _varlen_pass(
        self, seqs: list[Sequence], starts: list[int], ends: list[int], tables: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(token ids, positions, metadata) feeding tokens starts[i]:ends[i] of each sequence."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        bs = self.block_size
        for seq, start, end in zip(seqs, starts, ends):
            table = seq.block_ids
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + end - start)
        query_lens = [e - s for s, e in zip(query_start, query_start[1:])]
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.int64),
            query_start_loc=self._to_device(query_start, torch.int32),
            seq_lens=self._to_device(ends, torch.int32),
            block_tables=tables,
            max_query_len=max(query_lens),
            max_seq_len=max(ends),
            query_lens_cpu=query_lens,
            seq_lens_cpu=list(ends),
        )
        return self._to_device(ids, torch.int64), self._to_device(positions, torch.int64), meta

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = self.width
        rows = [seq.block_ids[:width] + [0] * (width - min(len(seq.block_ids), width)) for seq in seqs]
        return self._to_device(rows, torch.int32)

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _passes(self, bufs: DraftBuffers, token: torch.Tensor, sample: bool, host: _Host | None) -> None:
        b = bufs.b
        for j in range(1, self.k):
            meta = AttentionMetadata(
                slot_mapping=bufs.slots[j - 1],
                query_start_loc=bufs.qsl1,
                seq_lens=bufs.seq_lens[j - 1],
                block_tables=bufs.tables,
                max_query_len=1,
                max_seq_len=self.width * self.block_size,
                query_lens_cpu=[1] * b,
                seq_lens_cpu=host.seq_lens[j - 1] if host else [1] * b,
            )
            hidden = self.model(token, bufs.pos[j - 1], self.kv_cache, meta)
            token = self._choose(hidden, bufs, j, sample)

    def _choose(self, hidden: torch.Tensor, bufs: DraftBuffers, j: int, sample: bool) -> torch.Tensor:
        """Proposal j of every row: the argmax, or at temperature > 0 a draw from the draft's distribution."""
        logits = self.model.compute_logits(hidden)
        vd = logits.shape[1]
        if vd > self.vocab_size:
            logits = logits[:, : self.vocab_size]
        elif vd < self.vocab_size:
            logits = F.pad(logits, (0, self.vocab_size - vd), value=float("-inf"))
        token = logits.argmax(dim=1)
        if sample:
            greedy = bufs.temps == 0
            probs = torch.softmax(logits / torch.where(greedy, 1.0, bufs.temps).unsqueeze(1), dim=1)
            if self.sample_top_k:
                top, idx = probs.topk(self.sample_top_k, dim=1)
                probs = torch.zeros_like(probs).scatter_(1, idx, top / top.sum(dim=1, keepdim=True))
            bufs.probs[:, j].copy_(probs)
            # The exponential race: argmax(p / E), E ~ Exp(1), is a draw from p.
            token = torch.where(greedy, token, (probs / bufs.noise[j]).argmax(dim=1))
        bufs.tokens[:, j].copy_(token)
        return token

    # ----- inputs ------------------------------------------------------------------------------

    def _host_inputs(self, bufs: DraftBuffers, seqs: list[Sequence], starts: list[int], ks: list[int]) -> _Host:
        b, k, bs, width = bufs.b, self.k, self.block_size, self.width
        n_rows = len(seqs)
        ids0 = [0] * (2 * b)
        pos0 = [0] * (2 * b)
        slots0 = [0] * (2 * b)
        seq_lens0 = [2] * b
        pos = [[0] * b for _ in range(k - 1)]
        slots = [[0] * b for _ in range(k - 1)]
        seq_lens = [[1] * b for _ in range(k - 1)]
        tables: list[int] = []
        for i, (seq, kk) in enumerate(zip(seqs, ks)):
            n = seq.num_tokens
            table = seq.block_ids
            tables.extend(table[:width])
            tables.extend([0] * (width - min(len(table), width)))
            # Catch-up (regular path): the last two tokens; the first may be a re-feed of a cached one.
            for t, p in enumerate((n - 2, n - 1)):
                if p >= 0:
                    ids0[2 * i + t] = seq.token_ids[p]
                    pos0[2 * i + t] = p
                    slots0[2 * i + t] = table[p // bs] * bs + p % bs
            seq_lens0[i] = n
            # Pass j feeds proposal j at position n - 1 + j; rows that want fewer proposals idle in
            # the null block (slot 0, a one-token context) so they touch nothing of theirs.
            for j in range(1, kk):
                p = n - 1 + j
                pos[j - 1][i] = p
                slots[j - 1][i] = table[p // bs] * bs + p % bs
                seq_lens[j - 1][i] = p + 1
        tables.extend([0] * ((b - n_rows) * width))
        i64 = ids0 + pos0 + slots0 + [x for row in pos for x in row] + [x for row in slots for x in row]
        i32 = seq_lens0 + [x for row in seq_lens for x in row] + tables
        return _Host(i64, i32, seq_lens0, seq_lens)

    def _upload(self, bufs: DraftBuffers, host: _Host, temps: list[float], seqs: list[Sequence], sample: bool) -> None:
        bufs.i64.copy_(torch.tensor(host.i64, dtype=torch.int64), non_blocking=True)
        bufs.i32.copy_(torch.tensor(host.i32, dtype=torch.int32), non_blocking=True)
        if sample:
            self.set_temperatures(bufs, temps)
            self.draw_noise(bufs, seqs)

    def set_temperatures(self, bufs: DraftBuffers, temps: list[float]) -> None:
        """Each row's temperature for sampled calls (padding rows greedy)."""
        bufs.temps.copy_(torch.tensor(temps + [0.0] * (bufs.b - len(temps)), dtype=torch.float32), non_blocking=True)

    def draw_noise(self, bufs: DraftBuffers, seqs: list[Sequence]) -> None:
        """The exponential races of a sampled call's k proposals per row: from the draft's generator,
        except that a seeded request draws only from its own."""
        bufs.noise.exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                bufs.noise[:, row].exponential_(generator=seq.generator)

    def buffers(self, bucket: int) -> DraftBuffers:
        if bucket not in self._buffers:
            self._buffers[bucket] = DraftBuffers(bucket, self.k, self.width, self.vocab_size, self.device, self._shared)
        return self._buffers[bucket]

    def _new_buffers(self, n: int) -> DraftBuffers:
        return DraftBuffers(n, self.k, self.width, self.vocab_size, self.device)

    # ----- CUDA graphs -------------------------------------------------------------------------

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            bufs = self.buffers(b)
            # Idle inputs: every row a two-token context in the null block.
            bufs.i64.zero_()
            bufs.i32.zero_()
            bufs.seq_lens0.fill_(2)
            bufs.seq_lens.fill_(1)
            for sample in (False, True):
                self._forward_regular(bufs, sample, None)  # warm-up: compiles kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward_regular(bufs, sample, None)
                self._graphs[(b, sample)] = graph
        torch.cuda.synchronize()


@dataclass
class _SeqState:
    num_valid: int  # leading tokens of the sequence whose K/V the draft's cache holds
    num_recorded: int  # leading full blocks entered in DraftProposer._block_hashes
    base: int = 0  # num_tokens when the last proposals were made
    num_pending: int = 0  # proposals the draft computed K/V for; how many were kept is known next call


class DraftProposer:
    """The co-located draft: same device, same block tables as the target (see the module docstring)."""

    name = "draft"

    def __init__(self, draft: DraftModel) -> None:
        self.draft = draft
        self.block_size = draft.block_size
        self._states: dict[int, _SeqState] = {}
        self._block_hashes: dict[int, int] = {}  # block id -> chain hash of the full block the draft computed there
        self._pending: tuple[list[Sequence], Proposals] | None = None

    def propose(self, batch: list[SpecRequest]) -> Proposals:
        self._settle_pending()
        seqs = [r.seq for r in batch]
        ks = [r.num_tokens for r in batch]
        starts = []
        for seq, k in zip(seqs, ks):
            state = self._states.get(seq.seq_id)
            if state is None:
                state = self._states[seq.seq_id] = self._new_state(seq)
            start = min(state.num_valid, seq.num_tokens - 1)
            starts.append(start)
            # Blocks the draft writes this call no longer hold what the record says.
            bs = self.block_size
            for i in range(start // bs, (seq.num_tokens + k - 2) // bs + 1):
                self._block_hashes.pop(seq.blocks[i].block_id, None)
        proposals = self.draft.propose(seqs, starts, ks)
        for seq, k in zip(seqs, ks):
            state = self._states[seq.seq_id]
            state.num_valid = state.base = seq.num_tokens
            state.num_pending = k - 1
            self._record_blocks(seq, state)
        self._pending = (seqs, proposals)
        return proposals

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._states.pop(seq_id, None)

    # ----- chained steps (engine/spec/chain.py): the draft runs without propose() calls -----

    def begin_chain(self, seqs: list[Sequence]) -> None:
        """The sequences' next steps run chained: the draft writes from each one's second-last token on."""
        self._settle_pending()
        for seq in seqs:
            state = self._states[seq.seq_id]
            first_block = max(seq.num_tokens - 2, 0) // self.block_size
            state.num_recorded = min(state.num_recorded, first_block)
            self.blocks_added(seq, first_block)

    def blocks_added(self, seq: Sequence, first: int) -> None:
        """Blocks first.. of `seq` get the draft's K/V of a chained step: forget what they held."""
        for block in seq.blocks[first:]:
            self._block_hashes.pop(block.block_id, None)

    def end_chain(self, seqs: list[Sequence]) -> None:
        """Every chained step has been read back: the draft's cache holds all but each sequence's
        last two tokens (a step's catch-up always re-feeds those)."""
        for seq in seqs:
            state = self._states.get(seq.seq_id)
            if state is None:  # finished or aborted meanwhile
                continue
            state.num_valid = state.base = max(seq.num_tokens - 2, 0)
            state.num_pending = 0
            self._record_blocks(seq, state)

    def _settle_pending(self) -> None:
        """The draft's K/V of the proposals the target kept are valid: count them."""
        if self._pending is None:
            return
        seqs, proposals = self._pending
        self._pending = None
        proposed = proposals.host_token_ids()
        for seq, row in zip(seqs, proposed):
            state = self._states.get(seq.seq_id)
            if state is None:
                continue
            kept = 0
            while kept < state.num_pending and state.base + kept < seq.num_tokens:
                if seq.token_ids[state.base + kept] != row[kept]:
                    break
                kept += 1
            state.num_valid = state.base + kept
            state.num_pending = 0

    def _new_state(self, seq: Sequence) -> _SeqState:
        """Leading blocks (from the prefix cache) whose draft K/V this cache still holds."""
        i = 0
        while i < len(seq.block_hashes) and self._block_hashes.get(seq.blocks[i].block_id) == seq.block_hashes[i]:
            i += 1
        return _SeqState(num_valid=i * self.block_size, num_recorded=i)

    def _record_blocks(self, seq: Sequence, state: _SeqState) -> None:
        full = min(len(seq.block_hashes), state.num_valid // self.block_size)
        for i in range(state.num_recorded, full):
            self._block_hashes[seq.blocks[i].block_id] = seq.block_hashes[i]
        state.num_recorded = max(state.num_recorded, full)
