"""Speculative steps chained on the device: async scheduling with the co-located draft.

A synchronous speculative step reads its verdict back before the host can build the
next step's inputs, and the GPU idles meanwhile (0.2 ms of a 0.6 ms step at batch 1 on
an H200). While the batch stays the same (k proposals for every row, nobody joining
or leaving), the next step's inputs follow from the verdict alone: a row with n tokens
that accepted a proposals now has n + a + 1 (the target's own token last); the draft
re-feeds its last two tokens (the catch-up of DraftModel's regular call), proposes at
the positions after them, and the target checks its last token and the k proposals;
every slot comes from the block table. `SpecChain.launch` replays one CUDA graph per
batch bucket that computes these inputs from the verify pass's buffers, in place, and
runs the draft's and the verify pass's forward passes on them; then it queues the
verdict's copy to pinned host memory. The engine launches step N + 1 this way before it reads step N's
verdict, so the host's work of a step overlaps the GPU's, as with plain async decoding.

Rows at temperature > 0 chain too, cut to a top-k / top-p or not: the step's graph then
samples the draft's proposals and applies engine/spec/verify.py's accept/resample rule on
the device, and the host draws the step's noise (from the same generators, in the same
shapes and order as a synchronous step) just before it launches the graph. A chained
step is thus the synchronous step itself, computed ahead: a seeded request gets the
same tokens either way.

What the device cannot know stays with the engine (LLMEngine._chain_step): blocks,
allocated ahead for the most tokens a row can have reached, and when to stop chaining
(a row finished, a request waiting, the pool dry, a length limit near).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from engine.sequence import Sequence
from engine.spec.draft import DraftBuffers, DraftModel
from engine.spec.target_pass import TargetVerifyPass, VerifyBuffers
from engine.spec.verify import accept_or_resample, draw_accept_noise, target_probs


@dataclass
class LaunchedVerdict:
    """The verdict of a chained step, on its way to the host: [num_accepted, k + 1 tokens, k proposals]."""

    host: torch.Tensor  # [b, 2k + 2] int64, pinned on CUDA
    num_rows: int
    done: torch.cuda.Event | None  # None on the CPU (the step ran eagerly)

    def rows(self) -> list[list[int]]:
        if self.done is not None:
            self.done.synchronize()
        return self.host[: self.num_rows].tolist()


def advance_inputs(vbufs: VerifyBuffers, dbufs: DraftBuffers, k: int, block_size: int) -> None:
    """The next step's inputs of both passes, from the verify pass's inputs and verdict, in place
    (torch: the CPU's path and the reference of engine/spec/chain_kernel.py, which CUDA runs)."""
    bs = block_size
    steps = torch.arange(k + 1, dtype=torch.int64, device=vbufs.verdict.device)
    verdict = vbufs.verdict
    accepted = verdict[:, 0]
    active = vbufs.num_drafts > 0  # padding rows propose nothing
    # Padding rows stay a two-token context in the null block (their table rows are all 0).
    n = torch.where(active, vbufs.seq_lens.long() - k + accepted + 1, 2)
    bonus = verdict.gather(1, (accepted + 1).unsqueeze(1)).squeeze(1)
    last_accepted = vbufs.drafts.gather(1, (accepted - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    before = torch.where(accepted > 0, last_accepted, vbufs.last)
    tables = vbufs.tables

    def slots(pos: torch.Tensor) -> torch.Tensor:  # pos: [rows, m]
        return tables.gather(1, pos // bs).long() * bs + pos % bs

    # The draft: catch-up on tokens n - 2 and n - 1, then pass j feeds proposal j - 1 at n - 1 + j.
    two = n.unsqueeze(1) - 2 + steps[:2]
    dbufs.ids0.copy_(torch.stack([before, bonus], dim=1).view(-1))
    dbufs.pos0.copy_(two.view(-1))
    dbufs.slots0.copy_(slots(two).view(-1))
    dbufs.seq_lens0.copy_(n)
    if k > 1:
        ahead = n.unsqueeze(1) - 1 + steps[1:k]  # [rows, k - 1]
        dbufs.pos.copy_(ahead.T)
        dbufs.slots.copy_(slots(ahead).T)
        dbufs.seq_lens.copy_((ahead + 1).T)
    dbufs.tables.copy_(tables)
    # The target: its last known token at n - 1, the proposals after it.
    checked = n.unsqueeze(1) - 1 + steps
    vbufs.last.copy_(bonus)
    vbufs.positions.copy_(checked.view(-1))
    vbufs.slots.copy_(slots(checked).view(-1))
    vbufs.seq_lens.copy_(n + k)


class ChainMode(Enum):
    """What a chained step's graph computes its verdict with (one graph per bucket and mode)."""

    GREEDY = "greedy"  # every row at temperature 0: the verify pass's own verdict
    SAMPLED = "sampled"  # some rows at a temperature: rejection sampling on the device
    TRUNCATED = "truncated"  # and some cut to a top-k / top-p: the target's distributions sorted too

    @classmethod
    def of(cls, rows: list[Sequence], vocab: int) -> ChainMode:
        params = [s.params for s in rows]
        if all(p.temperature == 0.0 for p in params):
            return cls.GREEDY
        if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
            return cls.TRUNCATED
        return cls.SAMPLED


class SampledStepBuffers:
    """What a sampled chained step of one bucket reads besides the passes' own buffers."""

    def __init__(self, b: int, k: int, vocab: int, device: torch.device) -> None:
        # Temperatures: the draft's buffers hold them (DraftBuffers.temps), for both passes.
        self.top_ks = torch.full((b,), vocab, dtype=torch.int64, device=device)  # the vocabulary size: off
        self.top_ps = torch.ones(b, dtype=torch.float32, device=device)
        self.uniform = torch.zeros(b, k, device=device)  # the accept tests' U[0, 1)
        self.race = torch.ones(b, vocab, device=device)  # Exp(1) noise of each row's drawn token

    def set_cuts(self, rows: list[Sequence], vocab: int) -> None:
        """Each row's top-k and top-p (padding rows: nothing cut)."""
        pad = self.top_ks.shape[0] - len(rows)
        params = [s.params for s in rows]
        top_ks = torch.tensor([p.top_k or vocab for p in params] + [vocab] * pad, dtype=torch.int64)
        top_ps = torch.tensor([p.top_p for p in params] + [1.0] * pad, dtype=torch.float32)
        self.top_ks.copy_(top_ks, non_blocking=True)
        self.top_ps.copy_(top_ps, non_blocking=True)


class SpecChain:
    def __init__(self, draft: DraftModel, verify: TargetVerifyPass, generator: torch.Generator) -> None:
        if draft.k != verify.k:
            raise ValueError(f"the draft proposes {draft.k} tokens, the verify pass checks {verify.k}")
        self.draft = draft
        self.verify = verify
        self.generator = generator  # the engine sampler's: the accept tests of rows without a seed
        self.k = verify.k
        self.block_size = verify.block_size
        self.device = verify.device
        self._cuda = self.device.type == "cuda"
        self._graphs: dict[tuple[int, ChainMode], torch.cuda.CUDAGraph] = {}
        self._host: dict[int, list[tuple[torch.Tensor, torch.cuda.Event]]] = {}  # per bucket: two (verdict, copied) slots
        self._sampling: dict[int, SampledStepBuffers] = {}
        self._turn = 0
        self._rows: list[Sequence] = []
        self._mode = ChainMode.GREEDY
        self._advance = advance_inputs
        if self._cuda:
            from engine.spec.chain_kernel import advance_chain_inputs  # Triton: CUDA only

            self._advance = advance_chain_inputs
            self._capture()

    def fits(self, rows: list[Sequence]) -> bool:
        """Whether these rows can chain: on CUDA only where their bucket has a chain graph."""
        mode = ChainMode.of(rows, self.draft.vocab_size)
        return not self._cuda or (self.verify.bucket(len(rows)), mode) in self._graphs

    @torch.inference_mode()
    def begin(self, rows: list[Sequence], verdict: torch.Tensor) -> None:
        """The rows of the chained steps that follow, in the verify pass's order; their sampling
        parameters go to the device once. verdict: the synchronous step's [rows, 2k + 2], the first chained
        step's start (the verify pass's own buffer when every row is greedy)."""
        self._rows = rows
        self._mode = ChainMode.of(rows, self.draft.vocab_size)
        if self._mode is not ChainMode.GREEDY:
            b = self.verify.bucket(len(rows))
            self.verify.buffers(b).verdict[: len(rows)].copy_(verdict)  # drawn outside the pass's graph
            self.draft.set_temperatures(self.draft.buffers(b), [s.params.temperature for s in rows])
            self._sampled_buffers(b).set_cuts(rows, self.draft.vocab_size)

    @torch.inference_mode()
    def launch(self, new_blocks: list[tuple[int, int, list[int]]]) -> LaunchedVerdict:
        """Queues the step after the verify pass's last one for the rows given to `begin`.

        new_blocks: (row, first index, block ids) added to rows' block tables since that step.
        """
        num_rows = len(self._rows)
        b = self.verify.bucket(num_rows)
        vbufs = self.verify.buffers(b)
        for row, start, ids in new_blocks:
            vbufs.tables[row, start : start + len(ids)].copy_(torch.tensor(ids, dtype=torch.int32), non_blocking=True)
        if self._mode is not ChainMode.GREEDY:
            # Queued after the step before, which has read the last noise, and before this one.
            self.draft.draw_noise(self.draft.buffers(b), self._rows)
            sampling = self._sampled_buffers(b)
            draw_accept_noise(sampling.uniform[:num_rows], sampling.race[:num_rows], self.generator, self._rows)
        graph = self._graphs.get((b, self._mode))
        if graph is not None:
            graph.replay()
        else:
            self._step(b, self._mode)
        verdict = vbufs.verdict
        if not self._cuda:
            return LaunchedVerdict(verdict.clone(), num_rows, None)
        slots = self._host.get(b)
        if slots is None:
            slots = self._host[b] = [
                (torch.empty(verdict.shape, dtype=verdict.dtype, pin_memory=True), torch.cuda.Event()) for _ in range(2)
            ]
        # Two slots in turn: the host reads step N's while step N + 1's copy is queued.
        self._turn ^= 1
        host, done = slots[self._turn]
        host.copy_(verdict, non_blocking=True)
        done.record()
        return LaunchedVerdict(host, num_rows, done)

    def _step(self, b: int, mode: ChainMode) -> None:
        """One chained step of bucket b: its inputs, the draft's passes, the verify pass, the verdict.
        The verdict lands in the verify pass's own verdict buffer, where the next step's inputs come from."""
        vbufs = self.verify.buffers(b)
        dbufs = self.draft.buffers(b)
        self._advance(vbufs, dbufs, self.k, self.block_size)
        vbufs.drafts.copy_(self.draft.forward_in_place(b, mode is not ChainMode.GREEDY))
        logits, verdict = self.verify.forward_in_place(b)
        if mode is not ChainMode.GREEDY:
            sampling = self._sampled_buffers(b)
            cut = mode is ChainMode.TRUNCATED
            probs = target_probs(
                logits.view(b, self.k + 1, -1), dbufs.temps,
                sampling.top_ks if cut else None, sampling.top_ps if cut else None,
            )
            tokens, accepted = accept_or_resample(
                vbufs.drafts, vbufs.num_drafts, probs, dbufs.probs, sampling.uniform, sampling.race
            )
            verdict = torch.cat([accepted.unsqueeze(1), tokens, vbufs.drafts], dim=1)
        vbufs.verdict.copy_(verdict)

    def _sampled_buffers(self, b: int) -> SampledStepBuffers:
        buffers = self._sampling.get(b)
        if buffers is None:
            buffers = self._sampling[b] = SampledStepBuffers(b, self.k, self.draft.vocab_size, self.device)
        return buffers

    @torch.inference_mode()
    def _capture(self) -> None:
        """One graph per bucket and mode for the whole step: launching it costs the host one replay,
        and the GPU runs the inputs' few small kernels and both passes without a gap between graphs."""
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.verify.buckets):  # largest first, so smaller graphs reuse its memory
            if b not in self.draft.buckets or self.verify.buffers(b).verdict is None:
                continue
            self._sampled_buffers(b)  # allocated outside the capture: the host writes them between replays
            for mode in ChainMode:
                # Warm-up on the idle inputs of the passes' own captures, with a valid (all-zero) verdict;
                # a synchronous step rewrites every input before it runs.
                self.verify.buffers(b).verdict.zero_()
                self._step(b, mode)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._step(b, mode)
                self._graphs[(b, mode)] = graph
        torch.cuda.synchronize()
