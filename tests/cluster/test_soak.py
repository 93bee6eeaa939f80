"""cluster/soak.py's accounting: which failures are lost requests, which are errors, and the Soak: line."""

from __future__ import annotations

from loadtest.records import RequestRecord

from cluster.soak import is_lost, tally


def record(ok: bool = True, error: str = "") -> RequestRecord:
    return RequestRecord(start=0.0, end=1.0, endpoint="completions", stream=False, prompt_kind="short", ok=ok, latency_ms=1000.0, error=error)


def test_lost_means_no_complete_answer() -> None:
    assert is_lost(record(False, "connection error: ConnectionRefusedError: [Errno 111]"))
    assert is_lost(record(False, "stream broken: RemoteProtocolError: peer closed"))
    assert is_lost(record(False, "stream ended without [DONE]"))
    assert not is_lost(record(False, "HTTP 503: the server is overloaded; retry later"))
    assert not is_lost(record(False, "the model replica is unavailable; retry later"))  # an error event: answered
    assert not is_lost(record())


def test_tally_and_line() -> None:
    records = [record()] * 7 + [record(False, "HTTP 500: internal error"), record(False, "stream ended without [DONE]")]
    before = {"200": 10, "400": 1}
    after = {"200": 17, "400": 1, "500": 1, "499": 2}  # the server saw 10 requests; the clients logged 9
    result = tally(records, before, after, minutes=10, users=64, device="1x NVIDIA H100 80GB HBM3", command="python -m cluster.soak --gpu")
    assert (result.requests, result.ok, result.errors) == (9, 7, 1)
    assert result.unlogged == 1 and result.lost == 2
    assert result.server_statuses == {"200": 7, "499": 2, "500": 1}
    assert result.line() == (
        "Soak: 10 min at 64 users, 9 requests, 2 lost, 1 errors (1x NVIDIA H100 80GB HBM3, python -m cluster.soak --gpu)"
    )


def test_tally_without_server_counters() -> None:
    result = tally([record()] * 3, {}, {}, minutes=0.5, users=2, device="CPU", command="x")
    assert (result.requests, result.lost, result.errors, result.server_requests) == (3, 0, 0, None)
    assert result.line().startswith("Soak: 0.5 min at 2 users, 3 requests, 0 lost, 0 errors")
