"""A level's figures: one request's record, and shares from several client processes merged."""

from __future__ import annotations

import asyncio

import pytest

from bench.stream_levels import LevelResult, client_procs_for, merge_shares, record_request, record_way_out, run_level


def test_record_and_merge_shares():
    a, b = LevelResult(2), LevelResult(2)
    record_request(a, start=10.0, arrivals=[10.5, 11.5], tokens=5)  # TTFT 0.5 s, 4 gaps over 1 s
    record_request(b, start=0.0, arrivals=[], tokens=0)  # nothing arrived: no latency figures
    a.requests, b.requests, b.errors = 1, 1, 1
    a.server_ms, b.server_ms = {"ingress": [4.0]}, {"ingress": [6.0], "route": [1.0]}
    total = merge_shares(4, [(a, 100.0, 103.0), (b, 100.5, 104.0)])
    assert (total.requests, total.errors, total.output_tokens, total.seconds) == (2, 1, 5, 4.0)
    assert total.ttft_s == [0.5] and total.itl_s == [0.25]
    summary = total.summary()
    assert summary["tok_s"] == 1.25 and summary["server_ingress_mean_ms"] == 5.0 and summary["server_route_mean_ms"] == 1.0


def test_way_out_of_a_stream_from_its_end_timing():
    result = LevelResult(1)
    record_way_out(result, {"engine": 10.0, "replica": 10.002, "ingress": 10.0065}, received_unix_s=10.010)
    record_way_out(result, {"ingress": 20.0}, received_unix_s=20.004)  # no timing from the replica
    record_way_out(result, {}, received_unix_s=30.0)  # no comment at all: nothing recorded
    assert result.server_ms.keys() == {"out_replica", "out_ingress", "out_client"}
    assert [round(ms, 3) for ms in result.server_ms["out_replica"]] == [2.0]
    assert [round(ms, 3) for ms in result.server_ms["out_ingress"]] == [4.5]
    assert [round(ms, 3) for ms in result.server_ms["out_client"]] == [3.5, 4.0]


def test_run_level_caps_concurrency_and_counts_failures():
    in_flight, peak = 0, 0

    async def one(prompt, result):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        if prompt == [3]:
            raise RuntimeError("boom")

    result = asyncio.run(run_level([[i] for i in range(6)], 2, one))
    assert (result.requests, result.errors, peak) == (6, 1, 2)


@pytest.mark.parametrize("concurrency, at_least, at_most", [(1, 1, 1), (64, 1, 2), (256, 1, 8)])
def test_client_processes_grow_with_concurrency(concurrency, at_least, at_most):
    assert at_least <= client_procs_for(concurrency) <= at_most
