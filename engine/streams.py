"""When a request's consumer is woken, and how the outputs it missed are folded into one.

Waking an asyncio consumer costs more than a step's bookkeeping for one
request; a serving replica with hundreds of streams cannot afford it for
every step. So both engines hold a stream's outputs and wake its consumer
at most once per chunk interval, merging what piled up in between: the
first tokens and the end are never held (time to first token and the
finish are what callers wait for).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from engine.outputs import CompletionOutput, RequestOutput

ChunkInterval = Callable[[], float]


class ChunkPacer:
    """Says, for each new output of one stream, whether its consumer should be woken now."""

    def __init__(self, interval_s: ChunkInterval | None) -> None:
        self._interval_s = interval_s  # None: every output at once
        self._last_wake = -math.inf
        self._sent_tokens = False

    def due(self, now: float, finished: bool, has_tokens: bool) -> bool:
        first = has_tokens and not self._sent_tokens
        if finished or first or self._interval_s is None or now - self._last_wake >= self._interval_s():
            self._last_wake = now
            self._sent_tokens = self._sent_tokens or has_tokens
            return True
        return False

    def deadline(self) -> float:
        """When outputs held now are due should no newer one come (inf: never by time alone)."""
        return self._last_wake + (math.inf if self._interval_s is None else self._interval_s())

    def woken(self, now: float) -> None:
        """The consumer was woken without `due` (held outputs whose deadline passed)."""
        self._last_wake = now


def merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """`newer` with the per-step fields (new_token_ids, new_text, new_logprobs) of both."""
    before = {c.index: c for c in older.outputs}
    merged = [_merge_choice(before.get(c.index), c) for c in newer.outputs]
    return RequestOutput(
        newer.request_id, newer.prompt_token_ids, merged, newer.finished, newer.num_cached_tokens, newer.metrics
    )


def _merge_choice(older: CompletionOutput | None, newer: CompletionOutput) -> CompletionOutput:
    if older is None:
        return newer
    new_logprobs = newer.new_logprobs
    if older.new_logprobs is not None:
        new_logprobs = older.new_logprobs + (new_logprobs or [])
    return CompletionOutput(
        newer.index, newer.token_ids, newer.text, older.new_token_ids + newer.new_token_ids,
        older.new_text + newer.new_text, newer.finish_reason, newer.stop_reason, newer.logprobs, new_logprobs,
    )


class PacedWake:
    """Wakes one stream's consumer: when its pacer says so, or at the pacer's deadline for held outputs.

    The deadline timer covers a request that gets no output for a while
    (preempted, stalled) right after a step the pacer held back.
    """

    def __init__(self, pacer: ChunkPacer) -> None:
        import asyncio  # the engine's core process has no event loop; only consumers need it

        self._pacer = pacer
        self._event = asyncio.Event()
        self._held = False
        self._timer = None

    def offer(self, now: float, finished: bool, has_tokens: bool) -> None:
        """A new output is waiting for the consumer."""
        if self._pacer.due(now, finished, has_tokens):
            self._event.set()
            return
        self._held = True
        if self._timer is None:
            delay = self._pacer.deadline() - now
            if math.isfinite(delay):
                import asyncio

                self._timer = asyncio.get_running_loop().call_later(max(delay, 0.0), self._wake_held)

    def set(self) -> None:
        """Wakes the consumer now whatever the pacer says (an error)."""
        self._event.set()

    async def wait(self) -> None:
        """Returns once the consumer should take what is waiting."""
        await self._event.wait()
        self._event.clear()
        self._held = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake_held(self) -> None:
        self._timer = None
        if self._held and not self._event.is_set():
            self._pacer.woken(time.monotonic())
            self._event.set()


class OutputStream:
    """One request's `RequestOutput`s on their way to its consumer, merged while it is not due."""

    def __init__(self, pacer: ChunkPacer) -> None:
        self._wake = PacedWake(pacer)
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None

    def put(self, out: RequestOutput, now: float) -> None:
        self._pending = out if self._pending is None else merge_outputs(self._pending, out)
        self._wake.offer(now, out.finished, any(c.new_token_ids for c in out.outputs))

    def fail(self, exc: BaseException) -> None:
        if self._pending is not None and self._pending.finished:
            return  # the request ended first: its consumer gets the end, not the later failure
        self._error = exc
        self._wake.set()

    async def get(self) -> RequestOutput:
        await self._wake.wait()
        if self._error is not None:
            raise self._error
        out, self._pending = self._pending, None
        assert out is not None  # the pacer only wakes us for an output
        return out
