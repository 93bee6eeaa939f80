"""EngineCoreClient: the engine stepping in a child process, driven over a socket like AsyncLLMEngine."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import CacheConfig, ConfigError, EngineConfig, InvalidRequestError, SamplingParams, SchedulerConfig
from engine.core_process import EngineCoreClient
from engine.errors import EngineError, RequestAbortedError
from tests.engine.streaming import check_paced_stream, collect, wait_until


def _rand_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [_rand_tokens(n, 70 + n) for n in (1, 9, 23, 40)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
NUM_BLOCKS = 128


def _config(path) -> EngineConfig:
    return EngineConfig(
        model=str(path), dtype="float32", device="cpu",
        cache=CacheConfig(block_size=4, num_blocks=NUM_BLOCKS),
        scheduler=SchedulerConfig(max_num_batched_tokens=32),
    )


@pytest.fixture
def client(llama_ckpt):
    client = EngineCoreClient(_config(llama_ckpt))
    yield client
    client.shutdown()


def all_free(client: EngineCoreClient) -> bool:
    stats = client.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == NUM_BLOCKS - 1


def test_concurrent_streams_equal_the_in_process_engine(client, llama_ckpt, make_engine):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    expected = make_engine(llama_ckpt, block_size=4, num_blocks=NUM_BLOCKS).generate(PROMPTS, params)

    async def main():
        return await asyncio.gather(*(collect(client, p, params, f"r{i}") for i, p in enumerate(PROMPTS)))

    streams = asyncio.run(main())
    for stream, want in zip(streams, expected):
        last = stream[-1].outputs[0]
        assert [o.finished for o in stream] == [False] * (len(stream) - 1) + [True]
        assert last.token_ids == want.outputs[0].token_ids
        assert sum((o.outputs[0].new_token_ids for o in stream), []) == want.outputs[0].token_ids
        # Cumulative fields are rebuilt from per-step deltas on the client side.
        assert [lp.token_id for lp in last.logprobs] == want.outputs[0].token_ids
        for got_lp, want_lp in zip(last.logprobs, want.outputs[0].logprobs, strict=True):
            # Batches differ (chunked prefill here), so fp32 sums may round differently.
            assert got_lp.top.keys() == want_lp.top.keys()
            assert got_lp.top == pytest.approx(want_lp.top, abs=1e-5)
        assert stream[-1].prompt_token_ids == want.prompt_token_ids and last.finish_reason == "length"
    assert all_free(client)


def test_a_core_with_async_scheduling_streams_the_same_tokens_and_frees_aborted_blocks(llama_ckpt, make_engine):
    expected = make_engine(llama_ckpt, block_size=4, num_blocks=NUM_BLOCKS).generate(PROMPTS, GREEDY)
    config = _config(llama_ckpt)
    config.async_scheduling = True
    client = EngineCoreClient(config)

    async def main():
        leaving = client.generate(PROMPTS[3], LONG, "leaving")
        await leaving.__anext__()
        streams = asyncio.gather(*(collect(client, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)))
        await leaving.aclose()  # aborted while its next token is in flight
        streams = await streams
        await wait_until(lambda: all_free(client))
        return streams

    try:
        streams = asyncio.run(main())
    finally:
        client.shutdown()
    for stream, want in zip(streams, expected):
        assert stream[-1].finished and stream[-1].outputs[0].token_ids == want.outputs[0].token_ids
        assert sum((o.outputs[0].new_token_ids for o in stream), []) == want.outputs[0].token_ids


def test_leaving_a_stream_aborts_it_in_the_core_and_frees_its_blocks(client):
    async def main():
        agen = client.generate(PROMPTS[3], LONG, "closing")
        got = [await agen.__anext__(), await agen.__anext__()]
        assert not got[-1].finished and client.stats().num_free_blocks < NUM_BLOCKS - 1
        await agen.aclose()
        await wait_until(lambda: all_free(client))
        # Freed by the abort, not by running to max_tokens.
        assert client.stats().generation_tokens_total < 300
        return await collect(client, PROMPTS[1], GREEDY, "after")

    after = asyncio.run(main())
    assert after[-1].finished and len(after[-1].outputs[0].token_ids) == 12


@pytest.mark.parametrize(
    "prompt, params",
    [([], GREEDY), ([5, 384], GREEDY), ([5] * 2000, GREEDY), ("text but no tokenizer", GREEDY)],
    ids=["empty", "unknown-token", "too-long", "text-no-tokenizer"],
)
def test_invalid_requests_are_refused_in_the_client_and_others_are_served(client, prompt, params):
    async def main():
        good = asyncio.create_task(collect(client, PROMPTS[2], GREEDY, "good"))
        with pytest.raises(InvalidRequestError):
            await collect(client, prompt, params, "bad")
        return await good

    assert len(asyncio.run(main())[-1].outputs[0].token_ids) == 12


def test_duplicate_request_id_while_streaming_is_refused(client):
    async def main():
        agen = client.generate(PROMPTS[1], GREEDY, "dup")
        first = await agen.__anext__()
        with pytest.raises(InvalidRequestError, match="dup"):
            await collect(client, PROMPTS[2], GREEDY, "dup")
        return [first] + [o async for o in agen]

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 12


def test_cached_block_hashes_come_from_the_core(client, llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt, block_size=4, num_blocks=NUM_BLOCKS)
    engine.generate([PROMPTS[3]], GREEDY)

    async def main():
        await collect(client, PROMPTS[3], GREEDY, "cache-me")
        return await client.cached_block_hashes()

    hashes = asyncio.run(main())
    assert len(hashes) >= len(PROMPTS[3]) // 4
    assert sorted(hashes) == sorted(engine.cached_block_hashes())


def test_a_dead_core_fails_open_streams_and_later_requests(client):
    async def main():
        agen = client.generate(PROMPTS[2], LONG, "victim")
        await agen.__anext__()
        client._process.kill()  # the core dies mid-request (OOM killer, a segfault in a kernel)
        with pytest.raises(RequestAbortedError, match="engine core"):
            async for _ in agen:
                pass
        with pytest.raises(EngineError, match="failed"):
            await collect(client, PROMPTS[1], GREEDY, "later")

    asyncio.run(main())
    assert client.errored is not None


def test_a_config_the_core_cannot_load_raises_its_error_in_the_client(tmp_path):
    with pytest.raises(ConfigError):
        EngineCoreClient(EngineConfig(model="preset:no-such-preset", device="cpu"))


def test_a_chunk_interval_merges_steps_into_fewer_outputs(client):
    async def main():
        return await collect(client, PROMPTS[1], GREEDY, "paced", chunk_interval_s=lambda: 60.0)

    check_paced_stream(asyncio.run(main()), num_tokens=12)
