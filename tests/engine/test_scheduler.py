"""Scheduler: token budget, running before waiting, chunked prefill, max_num_seqs, preemption."""

from __future__ import annotations

import itertools

from engine.config import SchedulerConfig
from engine.kv_cache.allocator import PagedKVAllocator
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus

BS = 4


class Harness:
    """A scheduler over a real allocator; `step` plays the engine's part (no model)."""

    def __init__(self, num_blocks=64, budget=16, max_num_seqs=256, chunked=True, prefix_caching=False):
        self.alloc = PagedKVAllocator(num_blocks, BS, prefix_caching)
        cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
        self.sched = Scheduler(cfg, self.alloc)
        self._ids = itertools.count()
        self._tok = itertools.count(1000)

    def add(self, num_tokens: int, first_token: int = 0) -> Sequence:
        sid = next(self._ids)
        seq = Sequence(sid, f"r{sid}", 0, list(range(first_token, first_token + num_tokens)), SamplingParams(), 0.0)
        self.sched.add(seq)
        return seq

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        # Which sequences get a token sampled this step (read before the counters move).
        self.completes = [item.completes_sequence for item in out.scheduled]
        for item in out.scheduled:
            seq = item.seq
            done = item.completes_sequence
            seq.num_computed_tokens += item.num_new_tokens
            self.alloc.cache_full_blocks(seq)
            if done:
                seq.append_token(next(self._tok))
        return out


def plan(out: SchedulerOutput) -> list[tuple[int, int]]:
    return [(item.seq.seq_id, item.num_new_tokens) for item in out.scheduled]


def test_token_budget_is_respected_and_last_admission_is_chunked():
    h = Harness(budget=16)
    a, b, c = h.add(10), h.add(10), h.add(20)
    out = h.step()
    assert plan(out) == [(a.seq_id, 10), (b.seq_id, 6)]
    assert out.num_tokens == 16
    assert h.completes == [True, False]
    assert list(h.sched.waiting) == [c]
    # Running first: a decodes (1), b finishes its prompt (4), c gets the remaining 11.
    out = h.step()
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 4), (c.seq_id, 11)]
    assert out.num_tokens == 16
    for _ in range(5):
        assert h.step().num_tokens <= 16


def test_chunked_prefill_splits_a_long_prompt_across_steps():
    h = Harness(budget=16)
    seq = h.add(40)
    chunks = []
    while seq.num_output_tokens == 0:
        out = h.step()
        assert len(out.scheduled) == 1
        chunks.append((out.scheduled[0].num_new_tokens, h.completes[0]))
    assert chunks == [(16, False), (16, False), (8, True)]
    assert seq.num_computed_tokens == 40
    assert len(seq.blocks) == 10
    assert plan(h.step()) == [(seq.seq_id, 1)]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    h = Harness(budget=16, chunked=False)
    a, b = h.add(10), h.add(10)
    out = h.step()
    assert plan(out) == [(a.seq_id, 10)]  # b does not fit in the 6 tokens left and is not split
    assert list(h.sched.waiting) == [b]
    out = h.step()
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 10)]


def test_running_sequences_are_scheduled_before_waiting_ones():
    h = Harness(budget=16)
    a, b = h.add(8), h.add(8)
    h.step()  # both prompts, 16 tokens
    late = h.add(30)
    out = h.step()
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 1), (late.seq_id, 14)]
    assert h.sched.running == [a, b, late]


def test_max_num_seqs_caps_the_running_set():
    h = Harness(budget=64, max_num_seqs=2)
    a, b, c = h.add(5), h.add(5), h.add(5)
    out = h.step()
    assert plan(out) == [(a.seq_id, 5), (b.seq_id, 5)]
    assert list(h.sched.waiting) == [c]
    assert plan(h.step()) == [(a.seq_id, 1), (b.seq_id, 1)]
    h.sched.finish(a)
    assert a.status is SequenceStatus.FINISHED and a.blocks == []
    assert plan(h.step()) == [(b.seq_id, 1), (c.seq_id, 5)]


def test_a_waiting_sequence_is_not_admitted_without_blocks():
    h = Harness(num_blocks=5, budget=64)  # 4 usable blocks
    a, b = h.add(12), h.add(8)  # 3 blocks + 2 blocks > 4
    out = h.step()
    assert plan(out) == [(a.seq_id, 12)]
    assert list(h.sched.waiting) == [b] and b.blocks == []
    assert h.alloc.num_free_blocks == 1


def test_preemption_evicts_the_most_recently_admitted_and_requeues_it_first():
    h = Harness(num_blocks=7, budget=64)  # 6 usable blocks
    a, b, c = h.add(8), h.add(8), h.add(8)
    out = h.step()
    assert plan(out) == [(a.seq_id, 8), (b.seq_id, 8), (c.seq_id, 8)]
    assert h.alloc.num_free_blocks == 0
    late = h.add(4)
    # Every sequence now holds 9 tokens and needs a third block; none is free.
    out = h.step()
    assert out.preempted == [c]  # the newest admission goes
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 1)]  # its two blocks feed a and b
    assert h.sched.running == [a, b]
    assert list(h.sched.waiting) == [c, late]  # at the head, before the newer request
    assert c.status is SequenceStatus.WAITING
    assert c.num_computed_tokens == 0 and c.blocks == [] and c.num_preemptions == 1
    assert c.num_tokens == 9  # the sampled token is kept and recomputed
    assert h.alloc.num_free_blocks == 0
    for _ in range(3):  # tokens 10..12 fit in the third blocks; c (3 blocks) cannot come back
        out = h.step()
        assert out.preempted == [] and plan(out) == [(a.seq_id, 1), (b.seq_id, 1)]
    out = h.step()  # the 13th token needs a fourth block
    assert out.preempted == [b]
    assert plan(out) == [(a.seq_id, 1)]
    assert list(h.sched.waiting) == [b, c, late]
    assert h.sched.num_preemptions == 2
    assert h.alloc.num_free_blocks == 6 - 4


def test_no_admission_in_a_step_that_preempted():
    h = Harness(num_blocks=5, budget=64)  # 4 usable blocks
    a, b = h.add(8), h.add(8)
    h.step()
    small = h.add(1)
    out = h.step()
    assert out.preempted == [b]
    assert plan(out) == [(a.seq_id, 1)]
    assert list(h.sched.waiting) == [b, small]  # small would fit, but waits a step


def test_a_sequence_that_cannot_grow_preempts_itself():
    h = Harness(num_blocks=4, budget=64)  # 3 usable blocks
    a = h.add(12)
    h.step()
    out = h.step()  # 13 tokens need a 4th block that does not exist
    assert out.preempted == [a] and out.scheduled == []
    assert list(h.sched.waiting) == [a] and h.sched.running == []
    assert h.alloc.num_free_blocks == 3


def test_preempted_sequence_is_recomputed_with_its_generated_tokens():
    h = Harness(num_blocks=5, budget=64)
    a, b = h.add(8), h.add(8)
    h.step()
    h.step()  # b preempted, a decodes
    h.sched.finish(a)
    out = h.step()
    assert plan(out) == [(b.seq_id, 9)]  # prompt + the token sampled before preemption
    assert h.completes == [True]
    assert b.num_output_tokens == 2


def test_readmission_after_preemption_reuses_the_prefix_cache():
    h = Harness(num_blocks=5, budget=64, prefix_caching=True)
    a, b = h.add(8), h.add(8, first_token=100)
    h.step()
    out = h.step()
    assert out.preempted == [b]
    h.sched.finish(a)  # a's blocks free, b's first block still cached (freed tail first)
    out = h.step()
    # a took b's tail block when b was freed (tail first); b's head block is still cached.
    assert plan(out) == [(b.seq_id, 5)]
    assert b.num_computed_tokens == 9 and h.alloc.stats.hit_tokens == 4
    assert b.num_cached_tokens == 0  # only the first admission's hit counts for the request


def test_a_pending_token_at_the_length_limit_is_not_scheduled():
    """Async scheduling: a token still in flight counts; if it is the sequence's last, no row for it."""
    h = Harness()
    last, more = h.add(5), h.add(5)
    h.step()
    for seq in (last, more):  # the prompt ran; its first token is sampled but not read back
        seq.token_ids.pop()
        seq.num_pending_tokens = 1
    last.max_num_tokens = 6
    more.max_num_tokens = 7
    out = h.sched.schedule()
    assert plan(out) == [(more.seq_id, 1)]
    assert h.sched.running == [last, more]
