"""deployments/loop_lag.py: the lag it adds up is the time a busy loop held its check back."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.loop_lag import LoopLag


def test_a_blocked_loop_shows_as_lag_and_an_idle_one_does_not():
    async def main() -> tuple:
        lag = LoopLag(interval_s=0.005)
        lag.ensure_started()
        lag.ensure_started()  # once: a second call starts no second task
        await asyncio.sleep(0.1)
        idle = lag.totals()
        time.sleep(0.2)  # blocks the loop, as a handler doing CPU work would
        await asyncio.sleep(0.02)
        busy = lag.totals()
        lag.stop()
        await asyncio.sleep(0.02)
        return idle, busy, lag.totals(), len([t for t in asyncio.all_tasks() if t.get_name() == "loop-lag"])

    idle, busy, stopped, tasks = asyncio.run(main())
    assert idle.checks >= 5 and idle.lag_s / idle.checks < 0.05
    # The check due during the blocking call ran ~0.2 s late.
    assert 0.15 <= busy.max_lag_s <= 1.0 and busy.lag_s - idle.lag_s >= 0.15
    assert stopped.checks == busy.checks and tasks == 0


def test_record_keeps_totals_and_the_worst():
    lag = LoopLag()
    for s in (0.001, -0.0001, 0.004):
        lag.record(s)
    t = lag.totals()
    assert t.checks == 3 and t.lag_s == pytest.approx(0.005) and t.max_lag_s == 0.004
    with pytest.raises(ValueError, match="interval_s"):
        LoopLag(interval_s=0)
