"""Chunk pacing and output merging (engine/streams.py)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from engine.errors import RequestAbortedError
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.streams import ChunkPacer, merge_outputs


def test_pacer_wakes_for_first_tokens_and_the_end_at_once_and_otherwise_per_interval() -> None:
    pacer = ChunkPacer(lambda: 0.1)
    assert pacer.due(0.00, finished=False, has_tokens=True)  # first tokens: at once
    assert not pacer.due(0.05, finished=False, has_tokens=True)
    assert not pacer.due(0.09, finished=False, has_tokens=True)
    assert pacer.due(0.10, finished=False, has_tokens=True)  # an interval after the last wake
    assert not pacer.due(0.15, finished=False, has_tokens=True)
    assert pacer.due(0.16, finished=True, has_tokens=False)  # the end: at once


def test_pacer_without_interval_wakes_every_time_and_reads_the_interval_each_time() -> None:
    always = ChunkPacer(None)
    assert all(always.due(t, finished=False, has_tokens=True) for t in (0.0, 0.0, 0.001))
    interval = [math.inf]
    pacer = ChunkPacer(lambda: interval[0])
    assert pacer.due(0.0, finished=False, has_tokens=True)
    assert not pacer.due(5.0, finished=False, has_tokens=True)
    interval[0] = 1.0  # the load dropped: the next wake comes sooner
    assert pacer.due(5.0, finished=False, has_tokens=True)


def _out(new_ids: list[int], all_ids: list[int], text: str, new_text: str, finished: bool = False) -> RequestOutput:
    lps = [TokenLogprob(t, -0.5) for t in all_ids]
    new_lps = [TokenLogprob(t, -0.5) for t in new_ids]
    choice = CompletionOutput(0, all_ids, text, new_ids, new_text, "length" if finished else None, None, lps, new_lps)
    return RequestOutput("r", [1, 2], [choice], finished, num_cached_tokens=0)


def test_merge_keeps_the_newer_cumulative_fields_and_joins_the_per_step_ones() -> None:
    older = _out([5], [5], "a", "a")
    newer = _out([6, 7], [5, 6, 7], "abc", "bc", finished=True)
    merged = merge_outputs(older, newer).outputs[0]
    assert merged.token_ids == [5, 6, 7] and merged.text == "abc"
    assert merged.new_token_ids == [5, 6, 7] and merged.new_text == "abc"
    assert [lp.token_id for lp in merged.new_logprobs] == [5, 6, 7]
    assert merged.finish_reason == "length" and merge_outputs(older, newer).finished


# ----- OutputStream and the core client's _Stream: the same wake-up rules -------------------


def _stream_kinds():
    from engine.core_process import _Stream
    from engine.streams import OutputStream

    def output_stream(interval):
        stream = OutputStream(ChunkPacer(interval))
        return stream.put, stream.fail, stream.get

    def core_stream(interval):
        stream = _Stream("r", [1, 2], 1, ChunkPacer(interval))

        def put(out: RequestOutput, now: float) -> None:
            c = out.outputs[0]
            choice = (0, c.new_token_ids, c.new_text, c.finish_reason, c.stop_reason, c.new_logprobs)
            stream.apply(("r", out.finished, 0, None, [choice]), now)

        return put, stream.fail, stream.get

    return {"output-stream": output_stream, "core-stream": core_stream}


@pytest.mark.parametrize("kind", ["output-stream", "core-stream"])
def test_tokens_held_by_the_pacer_reach_the_consumer_when_no_later_output_comes(kind) -> None:
    """A request preempted (or stalled) right after a held step still gets its tokens an interval later."""

    async def main():
        put, _, get = _stream_kinds()[kind](lambda: 0.05)
        put(_out([5], [5], "a", "a"), time.monotonic())  # first tokens: at once
        assert (await get()).outputs[0].new_token_ids == [5]
        put(_out([6], [5, 6], "ab", "b"), time.monotonic())  # held; then nothing more for a long time
        return await asyncio.wait_for(get(), timeout=2.0)

    assert asyncio.run(main()).outputs[0].new_token_ids == [6]


@pytest.mark.parametrize("kind", ["output-stream", "core-stream"])
def test_a_failure_after_the_end_does_not_hide_the_finished_output(kind) -> None:
    async def main():
        put, fail, get = _stream_kinds()[kind](None)
        put(_out([5, 6], [5, 6], "ab", "ab", finished=True), time.monotonic())
        fail(RequestAbortedError("engine core failed"))  # e.g. the core died right after the last step
        return await get()

    out = asyncio.run(main())
    assert out.finished and out.outputs[0].token_ids == [5, 6]
