"""Continuous batching by token budget: running sequences first, then waiting ones.

Each step every running sequence gets its next token(s) (a decode, or the
next chunk of a long prompt), then waiting sequences are admitted while the
token budget, the sequence cap and the KV pool allow. When the pool runs dry
the most recently admitted running sequence is preempted: its blocks are
freed and it is recomputed later (never an out-of-memory crash).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.kv_cache.allocator import PagedKVAllocator
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    # Extra slots reserved past the known tokens (speculative proposals).
    num_lookahead_tokens: int = 0

    @property
    def completes_sequence(self) -> bool:
        """True when after this step every known token is computed, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # moved from waiting to running this step
    # Prompt tokens are computed: a sequence admitted, or a running one given more than one new token
    # (the next chunk of its prompt). Set while scheduling, so counting such steps costs no pass over the batch.
    computes_prompt: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, allocator: PagedKVAllocator, num_lookahead_tokens: int = 0, decode_steps: int = 1
    ) -> None:
        """num_lookahead_tokens: slots for speculative proposals; decode_steps: tokens a sequence that
        completes may sample in one launch (EngineConfig.num_scheduler_steps), each needing a slot
        but the last."""
        self.config = config
        self.allocator = allocator
        self.num_lookahead_tokens = num_lookahead_tokens
        self.decode_steps = decode_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        allocate_slots = self.allocator.allocate_slots
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending_tokens and seq.num_tokens >= seq.max_num_tokens:
                # Async scheduling: the token in flight is this sequence's last (the length
                # limit); computing its K/V would be wasted. The engine finishes it when it lands.
                i += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            lookahead = self._lookahead(seq, num_new)
            while not allocate_slots(seq, num_new + lookahead):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, num_new, lookahead))
                out.computes_prompt |= num_new > 1
                budget -= num_new
                i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            prefix = self.allocator.find_cached_prefix(seq)
            num_new = seq.num_tokens - prefix.num_tokens
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            lookahead = self._lookahead(seq, num_new, prefix.num_tokens)
            if not self.allocator.allocate_slots(seq, num_new + lookahead, prefix):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = prefix.num_tokens
            if not seq.first_scheduled:
                seq.num_cached_tokens = prefix.num_tokens
                seq.first_scheduled = True
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.admitted.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new, lookahead))
            out.computes_prompt = True
            budget -= num_new

    def _lookahead(self, seq: Sequence, num_new: int, num_computed: int | None = None) -> int:
        if not self.num_lookahead_tokens and self.decode_steps == 1:
            return 0
        computed = seq.num_computed_tokens if num_computed is None else num_computed
        if computed + num_new != seq.num_tokens:
            return 0  # a prompt chunk that samples nothing
        if self.num_lookahead_tokens:
            return self.num_lookahead_tokens if seq.params.use_speculation else 0
        return self.decode_steps_for(seq) - 1

    def decode_steps_for(self, seq: Sequence) -> int:
        """How many tokens `seq`, all its known tokens computed by the launch, samples in it: the
        launch's decode steps, fewer where its length limit comes first."""
        return max(1, min(self.decode_steps, seq.max_num_tokens - seq.num_tokens))

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.allocator.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence and returns its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq)
        seq.status = SequenceStatus.FINISHED
