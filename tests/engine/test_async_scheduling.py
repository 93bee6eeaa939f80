"""Async scheduling (EngineConfig.async_scheduling) against the synchronous step, on the CPU.

There is no asynchronous device here, but the logic is the same as on a GPU:
step N is scheduled and launched before step N-1's tokens are read back, its
inputs are taken from N-1's sampled tokens on the device, and a sequence that
N-1's token finishes has one wasted row in N. Each test runs the same work
both ways and compares tokens, finish and stop reasons, logprobs, text and the
KV pool (free blocks, cached block hashes) at the end.
"""

from __future__ import annotations

import asyncio

import pytest

from engine import SamplingParams
from engine.async_engine import AsyncLLMEngine
from engine.config import SpeculativeConfig

from tests.engine.step_runs import (
    BS, GREEDY, MAX_NEW, PROMPTS, assert_all_blocks_free, close_logprobs, pool_state, run, summary,
)


def both(make_engine, ckpt, **kwargs):
    sync = make_engine(ckpt, **kwargs)
    overlapped = make_engine(ckpt, async_scheduling=True, **kwargs)
    assert not sync.async_scheduling and overlapped.async_scheduling
    return sync, overlapped


# ----- greedy tokens: transformers, and the synchronous step -------------------------------------

CONFIGS = {
    "roomy": dict(block_size=BS, num_blocks=512),
    "chunked": dict(block_size=BS, num_blocks=512, max_num_batched_tokens=16),
    "preempting": dict(block_size=BS, num_blocks=30),
    "preempting-chunked-no-cache": dict(block_size=BS, num_blocks=30, max_num_batched_tokens=16, prefix_caching=False),
    "block-16": dict(block_size=16, num_blocks=64),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_greedy_matches_hf_and_the_sync_step(config, llama_ckpt, hf_greedy, make_engine):
    ref = [hf_greedy("tiny-llama", p, MAX_NEW) for p in PROMPTS]
    sync, overlapped = both(make_engine, llama_ckpt, **CONFIGS[config])
    want = run(sync, PROMPTS, GREEDY)
    got = run(overlapped, PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in got] == ref
    assert summary(got) == summary(want)
    if config.startswith("preempting"):
        assert overlapped.stats().num_preemptions > 0
    else:
        # Nothing was evicted: the very same blocks were registered, none holds a token not yet known.
        assert pool_state(overlapped) == pool_state(sync)
        # And a second round finds the same prefixes cached.
        again_sync, again = run(sync, PROMPTS, GREEDY), run(overlapped, PROMPTS, GREEDY)
        assert [o.num_cached_tokens for o in again] == [o.num_cached_tokens for o in again_sync]
        assert summary(again) == summary(want)
        assert pool_state(overlapped) == pool_state(sync)
    assert_all_blocks_free(overlapped)


def test_first_token_comes_one_step_later(llama_ckpt, make_engine):
    """Each step() returns what the step launched by the call before it sampled."""
    sync, overlapped = both(make_engine, llama_ckpt)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for engine in (sync, overlapped):
        engine.add_request("r", PROMPTS[2], params)
    assert [len(o.outputs[0].token_ids) for o in sync.step()] == [1]
    assert overlapped.step() == []  # the prefill is launched; its token is still "on the device"
    seq = overlapped.requests["r"].seqs[0]
    assert seq.num_pending_tokens == 1 and seq.num_tokens == len(PROMPTS[2]) + 1 == len(seq.token_ids) + 1
    assert [len(o.outputs[0].token_ids) for o in overlapped.step()] == [1]
    assert seq.num_pending_tokens == 1  # the second token is in flight now
    outs = overlapped.step()
    assert [len(o.outputs[0].token_ids) for o in outs] == [2]
    # The third token is the last (max_tokens): nothing is launched for it, the next call only reads it.
    assert overlapped.scheduler.schedule().is_empty
    outs = overlapped.step()
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "length"
    assert outs[0].outputs[0].token_ids == sync.generate([PROMPTS[2]], params)[0].outputs[0].token_ids
    assert overlapped.step() == [] and overlapped._inflight is None
    assert_all_blocks_free(overlapped)


# ----- stopping rules, n > 1, seeds, logprobs -----------------------------------------------------


def test_stop_tokens_mid_flight_waste_one_row_and_free_its_blocks(llama_ckpt, make_engine):
    sync, overlapped = both(make_engine, llama_ckpt, block_size=BS, num_blocks=512)
    prompt = PROMPTS[2]  # 17 tokens
    full = make_engine(llama_ckpt).generate([prompt], GREEDY)[0].outputs[0].token_ids
    # A stop at output j sits at position 17 + j; for j = 3, 7, ... the wasted row of the next
    # step needed a fresh block, which must come back.
    picks = [j for j in range(MAX_NEW) if full.index(full[j]) == j]
    assert any((len(prompt) + j) % BS == 0 for j in picks)
    params = [SamplingParams(max_tokens=MAX_NEW, temperature=0, stop_token_ids=[full[j]]) for j in picks]
    prompts = [prompt] * len(picks)
    want = run(sync, prompts, params)
    got = run(overlapped, prompts, params)
    assert summary(got) == summary(want)
    for o, j in zip(got, picks):
        assert o.outputs[0].token_ids == full[: j + 1] and o.outputs[0].stop_reason == full[j]
    assert pool_state(overlapped) == pool_state(sync)
    assert_all_blocks_free(overlapped)


def test_a_stop_costs_one_wasted_row_and_a_length_limit_none(llama_ckpt, make_engine):
    sync, overlapped = both(make_engine, llama_ckpt)
    full = sync.generate([PROMPTS[2]], GREEDY)[0].outputs[0].token_ids
    j = next(j for j in range(5, MAX_NEW) if full.index(full[j]) == j)
    cases = {
        "stop": SamplingParams(max_tokens=MAX_NEW, temperature=0, stop_token_ids=[full[j]]),  # j + 1 tokens
        "length": SamplingParams(max_tokens=j + 1, temperature=0, ignore_eos=True),
    }
    for name, params in cases.items():
        rows = {}
        for engine in (sync, overlapped):
            scheduled = []
            execute = engine.runner.execute
            engine.runner.execute = lambda sched, *a: scheduled.append(len(sched.scheduled)) or execute(sched, *a)
            out = engine.generate([PROMPTS[2]], params)[0].outputs[0]
            del engine.runner.execute
            assert out.token_ids == full[: j + 1]
            rows[engine.async_scheduling] = sum(scheduled)
        # Sync: the prompt, then one row per token but the last. Async: after a stop token,
        # the row it was fed in; after the length limit, none.
        assert rows[False] == 1 + j
        assert rows[True] == rows[False] + (name == "stop")
    assert_all_blocks_free(overlapped)


def test_mixed_params_match_the_sync_step(llama_ckpt, make_engine):
    """Lengths, stop ids, EOS, n > 1, seeded sampling, logprobs in one batch, with preemption."""
    probe, _ = both(make_engine, llama_ckpt)
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
        sync, overlapped = both(make_engine, llama_ckpt, block_size=BS, **kwargs)
        want = run(sync, prompts, params)
        got = run(overlapped, prompts, params)
        assert summary(got) == summary(want)
        assert close_logprobs(got, want)
        assert [o.outputs[0].finish_reason for o in got] == ["length", "stop", "length", "length", "length", "stop", "length"]
        assert sync.stats().generation_tokens_total == overlapped.stats().generation_tokens_total
        assert_all_blocks_free(overlapped)
    assert overlapped.stats().num_preemptions > 0


@pytest.mark.parametrize("start, length", [(3, 1), (11, 4)])
def test_stop_strings_match_the_sync_step(text_ckpt, make_engine, start, length):
    sync, overlapped = both(make_engine, text_ckpt)
    prompt = "def fibonacci(n):"
    full = sync.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].outputs[0]
    stop = full.text[start : start + length]
    params = [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=["never-there", stop]),
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
    ]
    want = run(sync, [prompt, prompt], params)
    got = run(overlapped, [prompt, prompt], params)
    assert summary(got) == summary(want)
    assert got[0].outputs[0].finish_reason == "stop" and got[0].outputs[0].stop_reason == stop
    assert got[0].outputs[0].text == full.text[: full.text.find(stop)]
    assert_all_blocks_free(overlapped)


# ----- aborts, serving loop, speculation -----------------------------------------------------------


def test_abort_of_a_request_with_a_token_in_flight(llama_ckpt, make_engine):
    sync, overlapped = both(make_engine, llama_ckpt, block_size=BS, num_blocks=64, max_num_batched_tokens=16)
    keep = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    want = sync.generate([PROMPTS[1], PROMPTS[3]], keep)
    params = SamplingParams(n=2, max_tokens=40, temperature=0, ignore_eos=True)
    start = overlapped.allocator.num_free_blocks
    overlapped.add_request("a", PROMPTS[1], keep)
    overlapped.add_request("gone", PROMPTS[2], params)
    overlapped.add_request("b", PROMPTS[3], keep)
    for _ in range(6):
        overlapped.step()
    seqs = overlapped.requests["gone"].seqs
    assert all(s.num_pending_tokens == 1 for s in seqs)  # mid-flight
    out = overlapped.abort_request("gone")
    assert out.finished and all(c.finish_reason == "abort" for c in out.outputs)
    assert all(s.blocks == [] for s in seqs)
    # The aborted rows of the step in flight are dropped when it completes.
    finals = {}
    while overlapped.has_unfinished_requests():
        for o in overlapped.step():
            assert o.request_id != "gone"
            if o.finished:
                finals[o.request_id] = o
    assert finals["a"].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert finals["b"].outputs[0].token_ids == want[1].outputs[0].token_ids
    assert overlapped.allocator.num_free_blocks == start
    assert_all_blocks_free(overlapped)


def test_async_engine_streams_match_the_sync_step(llama_ckpt, make_engine):
    expected = [o.outputs[0].token_ids for o in make_engine(llama_ckpt).generate(PROMPTS, GREEDY)]
    engine = AsyncLLMEngine(engine=make_engine(llama_ckpt, max_num_batched_tokens=32, async_scheduling=True))

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
    assert_all_blocks_free(engine.engine)


def test_speculative_decoding_keeps_the_synchronous_step(llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt, async_scheduling=True, speculative=SpeculativeConfig(method="ngram"))
    assert engine.config.async_scheduling and not engine.async_scheduling
    want = make_engine(llama_ckpt).generate(PROMPTS[:3], GREEDY)
    assert summary(engine.generate(PROMPTS[:3], GREEDY)) == summary(want)
