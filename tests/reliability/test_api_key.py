"""Optional API keys: the `tight` app takes its key from $RAYLLM_API_KEY (set only while serve_host builds it).

Without the key, or with a wrong one, every /v1 endpoint answers 401 with
OpenAI's `invalid_api_key`; /health and /metrics stay open; with the key
everything works, the official openai client included.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from reliability_helpers import GOOD_BODY, TIGHT_KEY, assert_serves, scrape

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CHAT_BODY = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def client(tight_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tight_url, timeout=60) as c:
        yield c


def unauthorized(samples: dict) -> float:
    return sum(s.value for s in samples.get("llm_requests", []) if s.name == "llm_requests_total" and s.labels["status"] == "401")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer sk-wrong"},
        {"authorization": TIGHT_KEY},  # no scheme
        {"authorization": f"Basic {TIGHT_KEY}"},
        {"authorization": f"Bearer {TIGHT_KEY}x"},
        {"x-api-key": TIGHT_KEY},
    ],
    ids=["none", "wrong", "no-scheme", "basic", "prefix", "other-header"],
)
def test_without_the_key_every_v1_endpoint_is_401(client: httpx.Client, headers: dict[str, str]) -> None:
    before = unauthorized(scrape(client))
    for method, path, body in (
        ("POST", "/v1/completions", GOOD_BODY),
        ("POST", "/v1/completions", {**GOOD_BODY, "stream": True}),
        ("POST", "/v1/chat/completions", CHAT_BODY),
        ("GET", "/v1/models", None),
    ):
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error" and "API key" in error["message"]
    assert unauthorized(scrape(client)) == before + 3  # generation endpoints are counted in the metrics


def test_a_bad_body_without_the_key_is_401_not_400(client: httpx.Client) -> None:
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401


def test_health_and_metrics_need_no_key(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_with_the_key_everything_works(client: httpx.Client, tight_url: str) -> None:
    auth = {"authorization": f"Bearer {TIGHT_KEY}"}
    assert_serves(client, auth)
    assert client.get("/v1/models", headers=auth).json()["data"][0]["id"] == "demo"
    assert client.post("/v1/chat/completions", json=CHAT_BODY, headers=auth).status_code == 200
    with client.stream("POST", "/v1/completions", json={**GOOD_BODY, "stream": True}, headers=auth) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and '"error"' not in "".join(lines)


def test_openai_client(tight_url: str) -> None:
    import openai

    good = openai.OpenAI(base_url=f"{tight_url}/v1", api_key=TIGHT_KEY, max_retries=0)
    assert good.completions.create(model="demo", prompt="def f():", max_tokens=2).choices[0].text is not None
    bad = openai.OpenAI(base_url=f"{tight_url}/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model="demo", prompt="def f():", max_tokens=2)
    assert err.value.code == "invalid_api_key"
