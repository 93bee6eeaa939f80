"""Two LLM replicas: a prompt goes to the replica whose KV cache holds its prefix.

This app also turns on an API key and stream coalescing, to cover those paths.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy_helpers import QUICK_STOP, ServeCluster, app_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

APP = "routed"
PREFIX_TOKENS = 64  # 4 blocks of 16
KEY = "sk-test"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def base_url(serve_cluster: ServeCluster, tiny_model: Path) -> Iterator[str]:
    args = app_args(tiny_model)
    args["llm_server"] = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}, **QUICK_STOP}
    args["api_key"] = KEY
    args["stream_interval_s"] = 0.05
    url = serve_cluster.deploy(APP, args)
    yield url
    serve_cluster.delete(APP)


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 384) for _ in range(n)]  # 0-2 are special tokens


def complete(client: httpx.Client, prompt: list[int]) -> tuple[str, int]:
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.headers["x-replica-id"], r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_shared_prefix_routed_to_the_caching_replica(base_url: str) -> None:
    rng = random.Random(0)
    owner: dict[tuple[int, ...], str] = {}
    with httpx.Client(base_url=base_url, timeout=60, headers=AUTH) as client:
        # New prefixes land anywhere (power of two choices); keep going until both replicas hold some.
        for _ in range(40):
            prefix = random_tokens(rng, PREFIX_TOKENS)
            replica, cached = complete(client, prefix + random_tokens(rng, 8))
            assert cached == 0
            owner[tuple(prefix)] = replica
            if len(owner) >= 6 and len(set(owner.values())) == 2:
                break
        assert len(set(owner.values())) == 2, "every new prefix went to one replica"
        time.sleep(0.5)  # replicas publish their caches every 50 ms in this app
        for prefix, replica in owner.items():
            for _ in range(2):
                got, cached = complete(client, list(prefix) + random_tokens(rng, 8))
                assert got == replica
                assert cached == PREFIX_TOKENS  # and the prefix really was reused there


def test_burst_sharing_a_prefix_stays_together(base_url: str) -> None:
    """Concurrent requests with a cached prefix all go to its replica (load stays under the threshold)."""
    rng = random.Random(1)
    prefix = random_tokens(rng, PREFIX_TOKENS)
    with httpx.Client(base_url=base_url, timeout=60, headers=AUTH) as client:
        replica, _ = complete(client, prefix + random_tokens(rng, 4))
    time.sleep(0.5)

    async def burst() -> list[str]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60, headers=AUTH) as c:
            bodies = [{"prompt": prefix + random_tokens(rng, 8), "max_tokens": 4} for _ in range(6)]
            responses = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
        assert all(r.status_code == 200 for r in responses)
        return [r.headers["x-replica-id"] for r in responses]

    assert asyncio.run(burst()) == [replica] * 6


def test_api_key_is_required(base_url: str) -> None:
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = httpx.post(f"{base_url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base_url}/v1/models").status_code == 401
    assert httpx.get(f"{base_url}/health").status_code == 200  # probes and scrapers need no key
    assert httpx.get(f"{base_url}/metrics").status_code == 200
    assert httpx.post(f"{base_url}/v1/completions", json=body, headers=AUTH).status_code == 200


def test_coalesced_stream_equals_unary(base_url: str) -> None:
    body = {"prompt": "Hello world!", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=base_url, timeout=60, headers=AUTH) as client:
        unary = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        texts = []
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    texts.append(json.loads(line.removeprefix("data: "))["choices"][0]["text"])
    assert "".join(texts) == unary
    assert len(texts) < 40  # several tokens per chunk
