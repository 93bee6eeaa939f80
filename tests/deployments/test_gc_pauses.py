"""deployments/gc_pauses.py: each collection of the process is timed under its generation."""

from __future__ import annotations

import gc

from deployments.gc_pauses import GcPauses


class _Cycle:
    def __init__(self) -> None:
        self.me = self  # garbage only the cyclic collector frees


def test_collections_are_counted_per_generation_while_started():
    ticks = iter(float(i) for i in range(100))
    pauses = GcPauses(clock=lambda: next(ticks))
    pauses.start()
    pauses.start()  # once: a second call registers no second callback
    try:
        for _ in range(3):
            _Cycle()
        gc.collect(2)
        gc.collect(0)
        totals = pauses.totals()
    finally:
        pauses.stop()
    # Each collection read the fake clock twice, one tick apart: 1 s apiece. Collections the
    # interpreter ran on its own meanwhile count too, so at least ours.
    assert totals.collections[2] >= 1 and totals.collections[0] >= 1
    assert totals.seconds[2] == totals.collections[2] and totals.seconds[0] == totals.collections[0]
    stats = pauses.stats()
    assert stats["gc_full_collections_total"] == totals.collections[2]
    assert stats["gc_collections_total"] == sum(totals.collections)
    assert stats["gc_pause_s_total"] == sum(totals.seconds)
    gc.collect(2)
    assert pauses.totals() == totals  # stopped: no longer counting
    assert pauses._on_collection not in gc.callbacks
