"""How late a replica's event loop runs what it was due to run: the wait every new request sees.

A replica does all its work (Serve's request handling, our handlers, every stream chunk) on one
asyncio loop. When that loop is busy, a request that has arrived waits before anything of ours
sees it, and neither the replica's CPU share nor its handler timings show that wait. So a task
sleeps a fixed interval over and over and adds up how much later than asked it woke: the mean
lag is the mean wait of a callback that became ready at a random time, to about half an interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LoopLagTotals:
    lag_s: float  # summed over checks
    checks: int
    max_lag_s: float


class LoopLag:
    def __init__(self, interval_s: float = 0.01, clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._interval_s = interval_s
        self._clock = clock
        self._lag_s = 0.0
        self._checks = 0
        self._max_lag_s = 0.0
        self._task: asyncio.Task | None = None

    def ensure_started(self) -> None:
        """Starts the checks on the running loop, once (callable from any coroutine or loop callback)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def record(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)  # a clock read a hair early is not negative lag
        self._lag_s += lag_s
        self._checks += 1
        self._max_lag_s = max(self._max_lag_s, lag_s)

    def totals(self) -> LoopLagTotals:
        return LoopLagTotals(self._lag_s, self._checks, self._max_lag_s)

    async def _run(self) -> None:
        while True:
            due = self._clock() + self._interval_s
            await asyncio.sleep(self._interval_s)
            self.record(self._clock() - due)
