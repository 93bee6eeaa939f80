"""EngineCoreClient: the engine stepping in a child process, driven over a socket like AsyncLLMEngine."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

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
    """A core of the test's own: for tests that stop, kill or must see an empty cache."""
    client = EngineCoreClient(_config(llama_ckpt))
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def _loop():
    # A client belongs to the first event loop that uses it: one loop for the module's shared cores.
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def _module_core(llama_ckpt, _loop):
    client = EngineCoreClient(_config(llama_ckpt))
    yield client
    client.shutdown()


@pytest.fixture
def shared(_module_core, _loop):
    """One core for the tests that leave it as they found it (a core start is seconds on CI): each
    must finish or abort its requests, which is checked after it."""
    yield _module_core
    _loop.run(wait_until(lambda: all_free(_module_core)))
    assert _module_core.errored is None


@pytest.fixture
def run(_loop):
    """asyncio.run for the tests of the module's shared cores: their event loop."""
    return _loop.run


def all_free(client: EngineCoreClient) -> bool:
    stats = client.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == NUM_BLOCKS - 1


def test_concurrent_streams_equal_the_in_process_engine(shared, run, llama_ckpt, make_engine):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    expected = make_engine(llama_ckpt, block_size=4, num_blocks=NUM_BLOCKS).generate(PROMPTS, params)

    async def main():
        return await asyncio.gather(*(collect(shared, p, params, f"r{i}") for i, p in enumerate(PROMPTS)))

    streams = run(main())
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
    assert all_free(shared)


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


def test_leaving_a_stream_aborts_it_in_the_core_and_frees_its_blocks(shared, run):
    before = shared.stats().generation_tokens_total

    async def main():
        agen = shared.generate(PROMPTS[3], LONG, "closing")
        got = [await agen.__anext__(), await agen.__anext__()]
        assert not got[-1].finished and shared.stats().num_free_blocks < NUM_BLOCKS - 1
        await agen.aclose()
        await wait_until(lambda: all_free(shared))
        # Freed by the abort, not by running to max_tokens.
        assert shared.stats().generation_tokens_total - before < 300
        return await collect(shared, PROMPTS[1], GREEDY, "after")

    after = run(main())
    assert after[-1].finished and len(after[-1].outputs[0].token_ids) == 12


@pytest.mark.parametrize(
    "prompt, params",
    [([], GREEDY), ([5, 384], GREEDY), ([5] * 2000, GREEDY), ("text but no tokenizer", GREEDY)],
    ids=["empty", "unknown-token", "too-long", "text-no-tokenizer"],
)
def test_invalid_requests_are_refused_in_the_client_and_others_are_served(shared, run, prompt, params):
    async def main():
        good = asyncio.create_task(collect(shared, PROMPTS[2], GREEDY, "good"))
        with pytest.raises(InvalidRequestError):
            await collect(shared, prompt, params, "bad")
        return await good

    assert len(run(main())[-1].outputs[0].token_ids) == 12


def test_duplicate_request_id_while_streaming_is_refused(shared, run):
    async def main():
        agen = shared.generate(PROMPTS[1], GREEDY, "dup")
        first = await agen.__anext__()
        with pytest.raises(InvalidRequestError, match="dup"):
            await collect(shared, PROMPTS[2], GREEDY, "dup")
        return [first] + [o async for o in agen]

    outs = run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 12


def test_cached_block_hashes_and_their_changes_come_from_the_core(client, llama_ckpt, make_engine):
    """The whole list, then the changes as diffs (one core of its own: both need an empty cache first)."""
    engine = make_engine(llama_ckpt, block_size=4, num_blocks=NUM_BLOCKS)
    engine.generate([PROMPTS[3]], GREEDY)
    first = engine.cached_block_hashes()
    engine.generate([PROMPTS[0]], GREEDY)

    async def main():
        await collect(client, PROMPTS[3], GREEDY, "cache-me")
        hashes = await client.cached_block_hashes()
        whole = await client.cached_block_changes(True)
        await collect(client, PROMPTS[0], GREEDY, "cache-me-too")
        return hashes, whole, await client.cached_block_changes(), await client.cached_block_changes()

    hashes, whole, diff, none = asyncio.run(main())
    assert len(hashes) >= len(PROMPTS[3]) // 4
    assert sorted(hashes) == sorted(first)
    assert whole.full and sorted(whole.added) == sorted(first)
    assert not diff.full and diff.added and not set(diff.added) & set(whole.added)
    assert sorted(set(whole.added) - set(diff.removed) | set(diff.added)) == sorted(engine.cached_block_hashes())
    assert none.added == [] and none.removed == [] and not none.full


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


def test_a_chunk_interval_merges_steps_into_fewer_outputs(shared, run):
    async def main():
        return await collect(shared, PROMPTS[1], GREEDY, "paced", chunk_interval_s=lambda: 60.0)

    check_paced_stream(run(main()), num_tokens=12)


def test_a_core_with_async_scheduling_returns_the_last_in_flight_tokens(llama_ckpt, make_engine):
    """With async scheduling a step's tokens come with the next step: the core must step until they do."""
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (1, 2, 5)]
    expected = make_engine(llama_ckpt, block_size=4, num_blocks=NUM_BLOCKS).generate(PROMPTS[:3], params)
    config = _config(llama_ckpt)
    config.async_scheduling = True
    client = EngineCoreClient(config)

    async def main():
        alone = await collect(client, PROMPTS[0], params[0], "alone")  # one request, one token
        together = await asyncio.gather(*(collect(client, p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(PROMPTS, params))))
        await wait_until(lambda: all_free(client))
        return [alone] + together

    try:
        streams = asyncio.run(main())
    finally:
        client.shutdown()
    for stream, want in zip(streams, [expected[0]] + expected):
        assert stream[-1].finished and stream[-1].outputs[0].token_ids == want.outputs[0].token_ids


def _stopped(process):
    os.kill(process.pid, signal.SIGSTOP)  # a core that reads nothing: stuck in a step, or swapped out


def test_sending_to_a_core_that_does_not_read_never_blocks_the_event_loop(client):
    pid = client._process.pid

    async def main():
        for i in range(50_000):  # far more than a socket buffer holds
            client._send(("abort", f"gone-{i}"))  # what a generate left early sends

    _stopped(client._process)
    runner = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    runner.start()
    runner.join(timeout=10)
    blocked = runner.is_alive()
    os.kill(pid, signal.SIGCONT)
    runner.join(timeout=30)
    assert not blocked

    async def after():
        return await collect(client, PROMPTS[1], GREEDY, "after")

    assert asyncio.run(after())[-1].finished


def test_shutdown_kills_and_reaps_a_core_that_does_not_stop(llama_ckpt):
    client = EngineCoreClient(_config(llama_ckpt), stop_grace_s=0.5)
    _stopped(client._process)
    client.shutdown()
    assert client._process.returncode is not None  # reaped: no zombie left behind


def test_shutdown_on_the_event_loop_does_not_wait_for_the_core(llama_ckpt):
    client = EngineCoreClient(_config(llama_ckpt), stop_grace_s=0.5)
    _stopped(client._process)

    async def main():
        start = time.monotonic()
        client.shutdown()  # e.g. from the replica's __del__, which Serve calls on its loop
        took = time.monotonic() - start
        await wait_until(lambda: client._process.returncode is not None)
        return took

    assert asyncio.run(main()) < 1.0


def test_a_core_not_ready_in_time_is_killed_and_reaped_and_its_socket_closed(llama_ckpt, monkeypatch):
    from engine import core_process

    spawned = []
    spawn = core_process._spawn_core
    monkeypatch.setattr(core_process, "_spawn_core", lambda: spawned.append(spawn()) or spawned[-1])
    with pytest.raises(EngineError, match="not ready"):
        EngineCoreClient(_config(llama_ckpt), startup_timeout_s=0.01)
    process, conn = spawned[0]
    assert process.returncode is not None and conn.closed


# ----- the replica's use of the core ---------------------------------------------------------


def _replica_class():
    from deployments.llm_server import LLMServer

    return LLMServer.func_or_class


def test_the_replica_destructor_runs_before_init_finished():
    """Serve calls __del__ even when the constructor raised or has not finished."""
    server = _replica_class().__new__(_replica_class())
    server.__del__()


def test_a_replica_constructor_that_fails_leaves_no_engine_running(monkeypatch):
    import deployments.llm_server as llm_server

    class FakeEngine:
        started = stopped = False

        def __init__(self):
            FakeEngine.started = True

        def shutdown(self):
            FakeEngine.stopped = True

    class Context:
        class replica_id:
            @staticmethod
            def to_full_id_str():
                return "replica-1"

    def no_index(name):
        raise ValueError(f"no actor {name!r}")

    monkeypatch.setattr(llm_server.serve, "get_replica_context", lambda: Context)
    monkeypatch.setattr(llm_server.serve, "get_deployment_actor", no_index)
    monkeypatch.setattr(llm_server, "_start_engine", lambda config, draft: FakeEngine())
    from deployments.config import AppConfig

    with pytest.raises(ValueError, match="no actor"):
        _replica_class()(config=AppConfig(model="preset:tiny-llama"))
    assert not FakeEngine.started or FakeEngine.stopped


def test_an_id_reused_right_after_leaving_gets_none_of_the_old_requests_tokens(shared, run, llama_ckpt, make_engine):
    """The old request's last steps may still be on their way when its id is used again."""
    expected = make_engine(llama_ckpt, block_size=4, num_blocks=NUM_BLOCKS).generate([PROMPTS[1]], GREEDY)[0]

    async def main():
        results = []
        for _ in range(5):
            old = shared.generate(PROMPTS[3], LONG, "reused")
            await old.__anext__()
            await asyncio.sleep(0.05)  # the core steps on: its deltas for "reused" are in flight
            await old.aclose()
            results.append(await collect(shared, PROMPTS[1], GREEDY, "reused"))
        return results

    for outs in run(main()):
        assert outs[-1].outputs[0].token_ids == expected.outputs[0].token_ids
        assert sum((o.outputs[0].new_token_ids for o in outs), []) == expected.outputs[0].token_ids


def test_a_failing_query_fails_its_caller_not_the_core(shared, run):
    async def main():
        with pytest.raises(EngineError, match="no_such_query"):
            await shared._call("no_such_query")
        return await collect(shared, PROMPTS[1], GREEDY, "after")

    assert run(main())[-1].finished and shared.errored is None


@pytest.fixture(scope="module")
def text_core(text_ckpt, _loop):
    """One core with a tokenizer for the text tests, on the module's loop."""
    client = EngineCoreClient(
        EngineConfig(model=str(text_ckpt), dtype="float32", device="cpu", cache=CacheConfig(block_size=4, num_blocks=NUM_BLOCKS))
    )
    yield client
    client.shutdown()


@pytest.mark.parametrize(
    ("params", "chunk_interval_s"),
    [
        (SamplingParams(n=2, max_tokens=16, temperature=0.9, seed=5, ignore_eos=True), None),  # text made by the client
        # The client decodes each chunk's tokens at once: several steps' tokens per decode here.
        (SamplingParams(n=2, max_tokens=16, temperature=0.9, seed=5, ignore_eos=True), lambda: 60.0),
        (SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=["e "]), None),  # by the core (stop strings)
    ],
    ids=["client-detokenizes", "client-detokenizes-chunks", "core-detokenizes"],
)
def test_text_equals_the_in_process_engine_wherever_it_is_made(text_core, run, text_ckpt, make_engine, params, chunk_interval_s):
    client = text_core
    prompts = ["The quick brown", "A serving system"]
    expected = make_engine(text_ckpt, block_size=4, num_blocks=NUM_BLOCKS).generate(prompts, params)

    async def main():
        return await asyncio.gather(
            *(collect(client, p, params, f"t{i}", chunk_interval_s=chunk_interval_s) for i, p in enumerate(prompts))
        )

    streams = run(main())
    if chunk_interval_s is not None:  # first tokens, one merged chunk, the end
        assert max(len(s) for s in streams) <= 3
    for stream, want in zip(streams, expected):
        for choice in want.outputs:
            got = [o.outputs[choice.index] for o in stream]
            assert got[-1].text == choice.text and got[-1].token_ids == choice.token_ids
            assert "".join(c.new_text for c in got) == choice.text  # each piece of text sent once
            assert (got[-1].finish_reason, got[-1].stop_reason) == (choice.finish_reason, choice.stop_reason)
    assert any(c.text for want in expected for c in want.outputs)
