"""Several decode steps per launch (EngineConfig.num_scheduler_steps), on the CPU, against one.

A launch samples its step's tokens, then runs k - 1 decode passes of those rows on the
device, each fed the tokens of the pass before, and the host reads them all back at once.
Each test runs the same work with one step per launch (async scheduling, already checked
against the synchronous step in test_async_scheduling.py) and with several, and compares
tokens, reasons, text, logprobs and the KV pool.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from engine import SamplingParams
from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig, SpeculativeConfig
from engine.errors import ConfigError

from tests.engine.step_runs import (
    BS, GREEDY, MAX_NEW, PROMPTS, assert_all_blocks_free, close_logprobs, pool_state, run, summary,
)


def pair(make_engine, ckpt, steps: int, **kwargs):
    one = make_engine(ckpt, async_scheduling=True, **kwargs)
    many = make_engine(ckpt, async_scheduling=True, num_scheduler_steps=steps, **kwargs)
    assert one.scheduler.decode_steps == 1 and many.scheduler.decode_steps == steps
    return one, many


def count_passes(engine) -> dict:
    """Counts the engine's launches and the decode passes after them (wraps the runner)."""
    counts = {"launches": 0, "passes": 0}
    execute, decode_pass = engine.runner.execute, engine.runner._decode_pass

    def counted_execute(*args):
        counts["launches"] += 1
        return execute(*args)

    def counted_pass(*args):
        counts["passes"] += 1
        return decode_pass(*args)

    engine.runner.execute, engine.runner._decode_pass = counted_execute, counted_pass
    return counts


CONFIGS = {
    "roomy": dict(block_size=BS, num_blocks=512),
    "chunked": dict(block_size=BS, num_blocks=512, max_num_batched_tokens=16),
    "preempting": dict(block_size=BS, num_blocks=30),
    "block-16": dict(block_size=16, num_blocks=64),
}


@pytest.mark.parametrize("steps", [2, 5])
@pytest.mark.parametrize("config", CONFIGS)
def test_greedy_matches_hf_and_one_step_per_launch(config, steps, llama_ckpt, hf_greedy, make_engine):
    ref = [hf_greedy("tiny-llama", p, MAX_NEW) for p in PROMPTS]
    one, many = pair(make_engine, llama_ckpt, steps, **CONFIGS[config])
    want = run(one, PROMPTS, GREEDY)
    got = run(many, PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in got] == ref
    assert summary(got) == summary(want)
    if config == "preempting":
        assert many.stats().num_preemptions > 0
    else:
        # The same blocks registered (no block hashed before its tokens were read back), and a
        # second round finds the same prefixes cached.
        assert pool_state(many) == pool_state(one)
        again_one, again = run(one, PROMPTS, GREEDY), run(many, PROMPTS, GREEDY)
        assert [o.num_cached_tokens for o in again] == [o.num_cached_tokens for o in again_one]
        assert summary(again) == summary(want)
    assert_all_blocks_free(many)


@pytest.mark.parametrize("max_tokens", [1, 4, 9, 12])
def test_launches_and_passes_for_a_length_limit(max_tokens, llama_ckpt, make_engine):
    """ceil(M / k) launches and M of tokens sampled: no pass past the limit."""
    k = 4
    _, many = pair(make_engine, llama_ckpt, k)
    counts = count_passes(many)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    out = many.generate([PROMPTS[2]], params)[0].outputs[0]
    assert len(out.token_ids) == max_tokens and out.finish_reason == "length"
    launches = math.ceil(max_tokens / k)
    assert counts == {"launches": launches, "passes": max_tokens - launches}
    assert_all_blocks_free(many)


def test_lookahead_slots_are_the_blocks_the_passes_write(llama_ckpt, make_engine):
    """A 7-token prompt (block size 4) that will sample 5 tokens in its first launch needs slots
    for positions 0-10: three blocks, taken when it is scheduled; a limit of 2 tokens needs 8 slots."""
    _, many = pair(make_engine, llama_ckpt, 5, block_size=BS, num_blocks=64)
    many.add_request("long", PROMPTS[0][:1] * 7, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    many.add_request("short", PROMPTS[1][:5] + [7, 8], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    sched = many.scheduler.schedule()
    assert [(it.num_new_tokens, it.num_lookahead_tokens) for it in sched.scheduled] == [(7, 4), (7, 1)]
    assert [len(it.seq.blocks) for it in sched.scheduled] == [3, 2]
    ids = [it.seq.block_ids for it in sched.scheduled]
    assert len(set(ids[0] + ids[1])) == 5 and 0 not in ids[0] + ids[1]  # block 0: the null block


def test_stop_tokens_mid_launch(llama_ckpt, make_engine):
    """A stop at any pass of a launch: the same tokens, its blocks back, the cache as with one step."""
    one, many = pair(make_engine, llama_ckpt, 4, block_size=BS, num_blocks=512)
    prompt = PROMPTS[2]
    full = make_engine(llama_ckpt).generate([prompt], GREEDY)[0].outputs[0].token_ids
    picks = [j for j in range(MAX_NEW) if full.index(full[j]) == j]
    assert {j % 4 for j in picks} == {0, 1, 2, 3}  # a stop at every pass of a launch
    params = [SamplingParams(max_tokens=MAX_NEW, temperature=0, stop_token_ids=[full[j]]) for j in picks]
    prompts = [prompt] * len(picks)
    want = run(one, prompts, params)
    got = run(many, prompts, params)
    assert summary(got) == summary(want)
    for o, j in zip(got, picks):
        assert o.outputs[0].token_ids == full[: j + 1] and o.outputs[0].stop_reason == full[j]
    assert pool_state(many) == pool_state(one)
    assert_all_blocks_free(many)


def test_a_stop_costs_the_launch_in_flight(llama_ckpt, make_engine):
    """The launch after the one that sampled the stop is already queued when the stop is read."""
    k = 4
    _, many = pair(make_engine, llama_ckpt, k)
    full = many.generate([PROMPTS[2]], GREEDY)[0].outputs[0].token_ids
    j = next(j for j in range(5, MAX_NEW) if full.index(full[j]) == j)
    counts = count_passes(many)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, stop_token_ids=[full[j]])
    assert many.generate([PROMPTS[2]], params)[0].outputs[0].token_ids == full[: j + 1]
    assert counts["launches"] == math.ceil((j + 1) / k) + 1
    assert counts["passes"] == counts["launches"] * (k - 1)
    assert_all_blocks_free(many)


def test_mixed_params_match_one_step_per_launch(llama_ckpt, make_engine):
    """Lengths, stop ids, n > 1, seeded sampling, logprobs in one batch, with and without preemption."""
    probe = make_engine(llama_ckpt)
    full = probe.generate([PROMPTS[3]], GREEDY)[0].outputs[0].token_ids
    params = [
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=MAX_NEW, temperature=0, stop_token_ids=[full[4]]),
        SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=9, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=MAX_NEW, temperature=0, logprobs=0, ignore_eos=True),
        SamplingParams(n=2, max_tokens=17, temperature=0, stop_token_ids=[full[9]], ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
    ]
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[2], PROMPTS[4], PROMPTS[5], PROMPTS[3], PROMPTS[6]]
    for kwargs in (dict(num_blocks=256), dict(num_blocks=30, max_num_batched_tokens=16)):
        one, many = pair(make_engine, llama_ckpt, 3, block_size=BS, **kwargs)
        want = run(one, prompts, params)
        got = run(many, prompts, params)
        assert summary(got) == summary(want)
        assert close_logprobs(got, want)
        assert [o.outputs[0].finish_reason for o in got] == ["length", "stop", "length", "length", "length", "stop", "length"]
        assert one.stats().generation_tokens_total == many.stats().generation_tokens_total
        assert_all_blocks_free(many)
    assert many.stats().num_preemptions > 0


def test_abort_with_a_launch_in_flight(llama_ckpt, make_engine):
    one, many = pair(make_engine, llama_ckpt, 4, block_size=BS, num_blocks=64, max_num_batched_tokens=16)
    keep = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    want = one.generate([PROMPTS[1], PROMPTS[3]], keep)
    start = many.allocator.num_free_blocks
    many.add_request("a", PROMPTS[1], keep)
    many.add_request("gone", PROMPTS[2], SamplingParams(n=2, max_tokens=40, temperature=0, ignore_eos=True))
    many.add_request("b", PROMPTS[3], keep)
    for _ in range(4):
        many.step()
    seqs = many.requests["gone"].seqs
    assert all(s.num_pending_tokens == 4 for s in seqs)  # a whole launch mid-flight
    out = many.abort_request("gone")
    assert out.finished and all(c.finish_reason == "abort" for c in out.outputs)
    assert all(s.blocks == [] for s in seqs)
    finals = {}
    while many.has_unfinished_requests():
        for o in many.step():
            assert o.request_id != "gone"
            if o.finished:
                finals[o.request_id] = o
    assert finals["a"].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert finals["b"].outputs[0].token_ids == want[1].outputs[0].token_ids
    assert many.allocator.num_free_blocks == start
    assert_all_blocks_free(many)


def test_async_engine_streams_tokens_in_groups(llama_ckpt, make_engine):
    k = 5
    expected = [o.outputs[0].token_ids for o in make_engine(llama_ckpt).generate(PROMPTS, GREEDY)]
    engine = AsyncLLMEngine(engine=make_engine(llama_ckpt, max_num_batched_tokens=32, async_scheduling=True,
                                               num_scheduler_steps=k))

    async def collect(prompt, rid):
        return [out async for out in engine.generate(prompt, GREEDY, rid)]

    async def main():
        return await asyncio.gather(*(collect(p, f"r{i}") for i, p in enumerate(PROMPTS)))

    try:
        streams = asyncio.run(main())
    finally:
        engine.shutdown()
    for stream, want in zip(streams, expected):
        assert stream[-1].finished and stream[-1].outputs[0].token_ids == want
        assert sum((o.outputs[0].new_token_ids for o in stream), []) == want
    # Up to k tokens a launch (more where the consumer fell behind), and never a step of one token each.
    assert max(len(o.outputs[0].new_token_ids) for s in streams for o in s) >= k
    assert_all_blocks_free(engine.engine)


# ----- where it applies ----------------------------------------------------------------------------


def test_needs_async_scheduling_and_no_speculation(llama_ckpt, make_engine):
    assert make_engine(llama_ckpt, num_scheduler_steps=4).scheduler.decode_steps == 1  # CPU: sync by default
    spec = make_engine(llama_ckpt, async_scheduling=True, num_scheduler_steps=4, speculative=SpeculativeConfig(method="ngram"))
    assert spec.scheduler.decode_steps == 1
    assert summary(spec.generate(PROMPTS[:3], GREEDY)) == summary(make_engine(llama_ckpt).generate(PROMPTS[:3], GREEDY))


@pytest.mark.parametrize("bad", [0, 65, True, 2.0, "4"])
def test_bad_step_counts_are_refused(bad):
    with pytest.raises(ConfigError, match="num_scheduler_steps"):
        EngineConfig(model="preset:tiny-llama", num_scheduler_steps=bad)
