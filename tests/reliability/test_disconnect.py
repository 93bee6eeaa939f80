"""A client that goes away mid-request: the request is aborted and its KV blocks return to the pool.

Checked from outside, on /metrics only: the replica's running requests and KV
usage go back to 0 within seconds, and it generated far fewer tokens than the
request asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from reliability_helpers import assert_serves, replica_values, sse_data, wait_for_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MAX_TOKENS = 2000  # at several ms a token: seconds longer than the test keeps the connection open


@pytest.fixture(scope="module")
def client(basic_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=basic_url, timeout=60) as c:
        yield c


def one(samples: dict[str, list[Any]], family: str, sample: str | None = None) -> float:
    """The value of the app's one LLM replica (NaN before it has published)."""
    values = list(replica_values(samples, family, sample).values())
    assert len(values) <= 1, values
    return values[0] if values else math.nan


def idle(samples: dict[str, list[Any]]) -> bool:
    return (
        one(samples, "llm_replica_running_requests") == 0
        and one(samples, "llm_replica_waiting_requests") == 0
        and one(samples, "llm_replica_kv_cache_usage_ratio") == 0
    )


def busy(samples: dict[str, list[Any]]) -> bool:
    return one(samples, "llm_replica_running_requests") >= 1 and one(samples, "llm_replica_kv_cache_usage_ratio") > 0


def generated(samples: dict[str, list[Any]]) -> float:
    return one(samples, "llm_replica_generation_tokens", "llm_replica_generation_tokens_total")


def test_disconnect_mid_stream_frees_kv_blocks(basic_url: str, client: httpx.Client) -> None:
    assert_serves(client)  # the replica has published its stats at least once
    before = wait_for_metrics(client, idle, 20, "an idle replica")
    body = {"prompt": "def main():", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=basic_url, timeout=60) as streamer:
        with streamer.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            # Keep the line iterator referenced: dropping it (a bare `break` out of a for loop)
            # lets httpx close the response at once, which would end the stream too early.
            lines = r.iter_lines()
            events = 0
            while events < 3:
                if sse_data(next(lines)) is not None:
                    events += 1
            # Mid-stream: /metrics sees the request running and holding blocks.
            wait_for_metrics(client, busy, 15, "the stream running")
            del lines
        # Leaving both blocks closes the connection mid-stream.
    after = wait_for_metrics(client, idle, 15, "the aborted stream's blocks back in the pool")
    assert one(after, "llm_replica_free_kv_blocks") == one(before, "llm_replica_free_kv_blocks")
    assert generated(after) - generated(before) < MAX_TOKENS  # aborted, not run to its end
    assert_serves(client)


def test_disconnect_while_waiting_for_a_unary_answer_frees_kv_blocks(basic_url: str, client: httpx.Client) -> None:
    before = wait_for_metrics(client, idle, 20, "an idle replica")
    body = {"prompt": "class Parser:", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=basic_url, timeout=httpx.Timeout(60, read=1.0)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json=body)
    after = wait_for_metrics(client, idle, 15, "the abandoned request's blocks back in the pool")
    assert one(after, "llm_replica_free_kv_blocks") == one(before, "llm_replica_free_kv_blocks")
    assert generated(after) - generated(before) < MAX_TOKENS
    assert_serves(client)
