"""AsyncLLMEngine: concurrent streams, cancellation frees blocks, bad requests fail only themselves."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import InvalidRequestError, SamplingParams
from engine.async_engine import AsyncLLMEngine
from tests.engine.streaming import check_paced_stream, collect, wait_until


def _rand_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [_rand_tokens(n, 50 + n) for n in (1, 7, 19, 40, 12)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)


@pytest.fixture
def async_engine(llama_ckpt, make_engine):
    engine = AsyncLLMEngine(engine=make_engine(llama_ckpt, block_size=4, num_blocks=128, max_num_batched_tokens=32))
    yield engine
    engine.shutdown()


def all_free(engine: AsyncLLMEngine) -> bool:
    inner = engine.engine
    return (
        not inner.has_unfinished_requests()
        and engine.stats().num_free_blocks == inner.allocator.pool.num_usable_blocks
        and engine.stats().kv_cache_usage == 0.0
    )


def test_concurrent_streams_match_the_sync_engine(async_engine, llama_ckpt, make_engine):
    expected = [o.outputs[0].token_ids for o in make_engine(llama_ckpt).generate(PROMPTS, GREEDY)]

    async def main():
        return await asyncio.gather(*(collect(async_engine, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)))

    streams = asyncio.run(main())
    for stream, want in zip(streams, expected):
        assert [o.finished for o in stream] == [False] * (len(stream) - 1) + [True]
        assert stream[-1].outputs[0].token_ids == want
        assert sum((o.outputs[0].new_token_ids for o in stream), []) == want
        assert stream[-1].outputs[0].finish_reason == "length"
    assert all_free(async_engine)


def test_requests_joining_while_others_stream(async_engine, llama_ckpt, make_engine):
    expected = [o.outputs[0].token_ids for o in make_engine(llama_ckpt).generate(PROMPTS[:3], GREEDY)]

    async def main():
        first = asyncio.create_task(collect(async_engine, PROMPTS[0], GREEDY, "first"))
        agen = async_engine.generate(PROMPTS[1], GREEDY, "second")
        await agen.__anext__()  # the engine is running now
        rest = [o async for o in agen]
        third = await collect(async_engine, PROMPTS[2], GREEDY, "third")
        return (await first)[-1], rest[-1], third[-1]

    outs = asyncio.run(main())
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_aclose_aborts_the_request_and_frees_its_blocks(async_engine):
    async def main():
        agen = async_engine.generate(PROMPTS[3], LONG, "closing")
        got = [await agen.__anext__(), await agen.__anext__()]
        assert not got[-1].finished
        assert async_engine.engine.allocator.num_free_blocks < async_engine.engine.allocator.pool.num_usable_blocks
        await agen.aclose()
        await wait_until(lambda: all_free(async_engine))
        # Freed by the abort, not by running to max_tokens: only a step or two more was generated.
        assert async_engine.stats().generation_tokens_total <= len(got) + 5
        # The engine still serves.
        return await collect(async_engine, PROMPTS[1], GREEDY, "after")

    after = asyncio.run(main())
    assert after[-1].finished and len(after[-1].outputs[0].token_ids) == 12


def test_cancelling_the_consumer_task_aborts_the_request(async_engine):
    async def main():
        started = asyncio.Event()
        seen = []

        async def consume():
            async for out in async_engine.generate(PROMPTS[2], LONG, "cancelled"):
                seen.append(out)
                started.set()

        other = asyncio.create_task(collect(async_engine, PROMPTS[1], GREEDY, "other"))
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        other_out = await other
        await wait_until(lambda: all_free(async_engine))
        # Freed by the abort, not by running to max_tokens (12 tokens were the other request's).
        assert async_engine.stats().generation_tokens_total <= 12 + len(seen) + 5
        return seen, other_out

    seen, other_out = asyncio.run(main())
    assert seen and not seen[-1].finished
    assert len(seen[-1].outputs[0].token_ids) < 300
    assert other_out[-1].finished and len(other_out[-1].outputs[0].token_ids) == 12


def _bad_params(**bad):
    p = SamplingParams(max_tokens=4, temperature=0)
    for k, v in bad.items():
        setattr(p, k, v)
    return p


@pytest.mark.parametrize(
    "prompt, params",
    [
        ([], GREEDY),
        ([5, 384], GREEDY),
        ([5] * 2000, GREEDY),
        ([5, 6], _bad_params(temperature=-1.0)),
        ([5, 6], _bad_params(max_tokens=0)),
        ("text but no tokenizer", GREEDY),
    ],
    ids=["empty", "unknown-token", "too-long", "negative-temperature", "max-tokens-0", "text-no-tokenizer"],
)
def test_invalid_request_raises_from_generate_and_others_are_served(async_engine, llama_ckpt, make_engine, prompt, params):
    expected = make_engine(llama_ckpt).generate([PROMPTS[2]], GREEDY)[0].outputs[0].token_ids

    async def main():
        good = asyncio.create_task(collect(async_engine, PROMPTS[2], GREEDY, "good"))
        with pytest.raises(InvalidRequestError):
            await collect(async_engine, prompt, params, "bad")
        first = await good
        # The refused id is free for a later request.
        second = await collect(async_engine, PROMPTS[2], GREEDY, "bad")
        return first, second

    first, second = asyncio.run(main())
    assert first[-1].outputs[0].token_ids == expected
    assert second[-1].outputs[0].token_ids == expected
    assert all_free(async_engine)


def test_duplicate_request_id_while_streaming_is_refused(async_engine):
    async def main():
        agen = async_engine.generate(PROMPTS[1], GREEDY, "dup")
        first = await agen.__anext__()
        with pytest.raises(InvalidRequestError, match="dup"):
            await collect(async_engine, PROMPTS[2], GREEDY, "dup")
        rest = [o async for o in agen]
        return [first] + rest

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].prompt_token_ids == PROMPTS[1]
    assert len(outs[-1].outputs[0].token_ids) == 12


def test_a_failing_step_fails_open_streams_and_later_requests(async_engine, monkeypatch):
    from engine.errors import EngineError, RequestAbortedError

    def broken_step():
        raise RuntimeError("boom")

    async def main():
        monkeypatch.setattr(async_engine.engine, "step", broken_step)
        with pytest.raises(RequestAbortedError, match="boom"):
            await collect(async_engine, PROMPTS[1], GREEDY, "victim")
        await wait_until(lambda: async_engine.errored is not None)
        with pytest.raises(EngineError, match="failed"):
            await collect(async_engine, PROMPTS[1], GREEDY, "later")

    asyncio.run(main())


def test_a_chunk_interval_merges_steps_into_fewer_outputs(async_engine):
    async def main():
        return await collect(async_engine, PROMPTS[1], GREEDY, "paced", chunk_interval_s=lambda: 60.0)

    check_paced_stream(asyncio.run(main()), num_tokens=12)
