"""KV cache exhaustion: preemption (by recompute), not a crash; every request still completes.

The `tight` app's replica has 24 KV blocks of 16 tokens (384 tokens). Five
concurrent requests of 200 new tokens each need about 70 blocks: the
scheduler must preempt and resume them, and /metrics must show it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from reliability_helpers import TIGHT_KEY, assert_serves, replica_values, wait_for_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

AUTH = {"authorization": f"Bearer {TIGHT_KEY}"}
MAX_TOKENS = 200
REQUESTS = 5  # <= 4 running + 2 queued of the tight app: none is refused


@pytest.fixture(scope="module")
def client(tight_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tight_url, headers=AUTH, timeout=120) as c:
        yield c


def preemptions(samples: dict[str, list[Any]]) -> float:
    return sum(replica_values(samples, "llm_replica_preemptions", "llm_replica_preemptions_total").values())


def idle(samples: dict[str, list[Any]]) -> bool:
    running = replica_values(samples, "llm_replica_running_requests")
    return bool(running) and sum(running.values()) == 0 and sum(replica_values(samples, "llm_replica_kv_cache_usage_ratio").values()) == 0


def test_kv_exhaustion_preempts_and_every_request_completes(tight_url: str, client: httpx.Client) -> None:
    assert_serves(client, AUTH)
    before = wait_for_metrics(client, idle, 30, "an idle replica")

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tight_url, headers=AUTH, timeout=180) as c:
            bodies = [
                {"prompt": f"# worker {i}\nimport os\n", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
                for i in range(REQUESTS)
            ]

            async def post(i: int, body: dict[str, Any]) -> httpx.Response:
                # A little apart: Serve counts a request as queued until it is routed, so a
                # simultaneous burst could be refused by max_queued_requests (test_overload's job).
                await asyncio.sleep(0.3 * i)
                return await c.post("/v1/completions", json=body)

            return await asyncio.gather(*(post(i, b) for i, b in enumerate(bodies)))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * REQUESTS, [r.text[:200] for r in responses]
    for r in responses:
        choice = r.json()["choices"][0]
        assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS and choice["finish_reason"] == "length"
    after = wait_for_metrics(client, idle, 30, "the KV pool empty again")
    assert preemptions(after) > preemptions(before), "the cache was too small for the batch: expected preemptions"
    assert_serves(client, AUTH)
