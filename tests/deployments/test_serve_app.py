"""The real app on a local Ray: one LLM replica, talked to over HTTP only.

Greedy answers are compared token for token (as text and counts) with the
same engine run directly in this process.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy_helpers import ServeCluster, app_args

from deployments.server_timing import parse_end_timing, parse_server_timing

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

APP = "single"


@pytest.fixture(scope="module")
def base_url(serve_cluster: ServeCluster, tiny_model: Path) -> Iterator[str]:
    url = serve_cluster.deploy(APP, app_args(tiny_model))
    yield url
    serve_cluster.delete(APP)


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_model: Path):
    """The engine with the app's exact config, in this process."""
    from deployments.config import parse_app_config
    from engine import LLMEngine

    return LLMEngine(parse_app_config(app_args(tiny_model)).to_engine_config())


def greedy(reference, prompt: str | list[int], max_tokens: int):
    from engine import SamplingParams

    ids = reference.tokenize(prompt)
    return reference.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0))[0].outputs[0]


def replica_stats() -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("LLMServer", APP).stats.remote().result(timeout_s=30)


def sse_events(lines: Iterator[str]) -> list[Any]:
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ----- plain endpoints ------------------------------------------------------------------------


def test_health_and_models(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == 1024


# ----- completions -----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["Hello world! How are", "def fibonacci(n):"])
def test_completion_equals_engine(client: httpx.Client, reference, prompt: str) -> None:
    expected = greedy(reference, prompt, 24)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)
    assert body["usage"]["prompt_tokens"] == len(reference.tokenize(prompt))
    assert r.headers["x-replica-id"].startswith("SERVE_REPLICA::single#LLMServer#")


def test_completion_token_ids_and_logprobs(client: httpx.Client, reference) -> None:
    ids = reference.tokenize("The quick brown fox")
    expected = greedy(reference, ids, 8)
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == expected.text
    lp = choice["logprobs"]
    assert [reference.tokenizer.decode([t]) for t in expected.token_ids] == lp["tokens"]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(expected.token_ids)
    # Greedy: the chosen token is the most likely one.
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 2 and chosen == pytest.approx(max(top.values()), abs=1e-5)


def test_completion_stream_equals_unary(client: httpx.Client, reference) -> None:
    prompt = "Ray Serve routes requests"
    expected = greedy(reference, prompt, 16)
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        timing = parse_server_timing(r.headers["server-timing"])
        lines = [line for line in r.iter_lines() if line]
        received = time.time()
    events = sse_events(iter(lines))
    # Where the time to first token went: routing to the replica plus the replica's own
    # wait make up the ingress's wait, which the handler's time contains (clocks of one
    # machine; 1 ms of rounding room).
    # router: the part of routing before our request router took the request up; accepted: when
    # the replica's admission answer was back in the ingress, which is before the first output.
    assert set(timing) == {"ingress", "route", "router", "accepted", "replica", "handler"}
    assert min(timing.values()) >= 0 and timing["route"] + timing["replica"] <= timing["ingress"] + 1.0
    assert timing["router"] <= timing["route"] + 1.0
    assert timing["router"] <= timing["accepted"] + 1.0 and timing["accepted"] <= timing["ingress"] + 1.0
    assert timing["ingress"] <= timing["handler"] + 1.0
    assert events[-1] == "[DONE]"
    # The way out, in a comment line just before [DONE]: the engine's finish, then the last output
    # on the replica, then the last write of the ingress, then the client (1 ms of rounding room).
    assert lines[-1] == "data: [DONE]"
    end = parse_end_timing(lines[-2])
    assert list(end) == ["engine", "replica", "ingress"], lines[-2]
    assert end["engine"] <= end["replica"] + 1e-3 <= end["ingress"] + 2e-3 <= received + 3e-3
    chunks = events[:-1]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == len(expected.token_ids)
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == expected.text
    assert chunks[-2]["choices"][0]["finish_reason"] == expected.finish_reason
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "text_completion" for c in chunks)


def test_completion_batch_of_prompts_and_n(client: httpx.Client, reference) -> None:
    prompts = ["Hello world!", "Paged attention"]
    r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 6, "temperature": 0, "n": 2})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        expected = greedy(reference, prompt, 6).text
        assert choices[2 * i]["text"] == choices[2 * i + 1]["text"] == expected


def test_echo_and_stop(client: httpx.Client, reference) -> None:
    prompt = "Hello world! How are"
    full = greedy(reference, prompt, 24).text
    stop = full[5:8]
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop], "echo": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == prompt + full[: full.index(stop)]


# ----- chat ----------------------------------------------------------------------------------------


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello world! How are you?"}]


def chat_ids(reference) -> list[int]:
    text = reference.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return reference.tokenize(text)


def test_chat_equals_engine(client: httpx.Client, reference) -> None:
    expected = greedy(reference, chat_ids(reference), 20)
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": expected.text}
    assert body["usage"]["prompt_tokens"] == len(chat_ids(reference))
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)


def test_chat_stream(client: httpx.Client, reference) -> None:
    expected = greedy(reference, chat_ids(reference), 12)
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason


# ----- the official openai client -------------------------------------------------------------------


def test_openai_client(base_url: str, reference) -> None:
    import openai

    oa = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in oa.models.list()] == ["tiny"]

    prompt = "def fibonacci(n):"
    expected = greedy(reference, prompt, 10).text
    comp = oa.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert comp.choices[0].text == expected
    streamed = "".join(
        c.choices[0].text for c in oa.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    )
    assert streamed == expected

    expected_chat = greedy(reference, chat_ids(reference), 10).text
    chat = oa.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == expected_chat
    stream = oa.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts) == expected_chat
    assert usage is not None and usage.completion_tokens == len(greedy(reference, chat_ids(reference), 10).token_ids)

    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model="tiny", prompt=prompt, max_tokens=5000)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="gpt-17", prompt=prompt, max_tokens=5)


# ----- bad input ---------------------------------------------------------------------------------------


BAD_BODIES = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi " * 2000, "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 99999], "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "", "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 1.0}, 400, None),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "frobnicate": True}, 400, "frobnicate"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-17"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_BODIES)
def test_bad_request_gets_openai_error(client: httpx.Client, path: str, body: Any, status: int, param: str | None) -> None:
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    # ...and the server still answers.
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_unknown_route_is_openai_404(client: httpx.Client) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


# ----- concurrency, disconnects, metrics ----------------------------------------------------------------


def test_concurrent_requests_share_the_batch(base_url: str) -> None:
    """16 requests at once: all answered, and the replica ran several in one batch."""
    peak = {"running": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak["running"] = max(peak["running"], replica_stats()["num_running"])
            time.sleep(0.01)

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as c:
            bodies = [
                {"prompt": f"Request number {i} says hello", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
                for i in range(16)
            ]
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        responses = asyncio.run(fire())
    finally:
        stop.set()
        watcher.join()
    assert [r.status_code for r in responses] == [200] * 16
    assert all(r.json()["usage"]["completion_tokens"] == 48 for r in responses)
    assert peak["running"] > 1


def wait_idle(timeout_s: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = replica_stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0:
            return stats
        assert time.monotonic() < deadline, f"replica still busy: {stats}"
        time.sleep(0.05)


def test_client_disconnect_mid_stream_frees_blocks(base_url: str) -> None:
    before = wait_idle()
    body = {"prompt": "Hello world!", "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=base_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert replica_stats()["num_running"] == 1
    # Connection closed: the request must be aborted and its blocks freed.
    after = wait_idle()
    assert after["generation_tokens_total"] - before["generation_tokens_total"] < 1000


def test_client_disconnect_unary_frees_blocks(base_url: str) -> None:
    before = wait_idle()
    body = {"prompt": "Hello world!", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(60, read=0.5)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=body)
    after = wait_idle()
    assert after["generation_tokens_total"] - before["generation_tokens_total"] < 1000


def scrape(client: httpx.Client) -> dict[str, list[Any]]:
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def requests_total(samples: dict[str, list[Any]], endpoint: str, status: str) -> float:
    return sum(
        s.value
        for s in samples.get("llm_requests", [])
        if s.name == "llm_requests_total" and s.labels == {"endpoint": endpoint, "status": status}
    )


def total(samples: dict[str, list[Any]], name: str) -> float:
    """A counter family's value summed over its labels (0 when absent)."""
    return sum(s.value for s in samples.get(name, []) if s.name == f"{name}_total")


def test_metrics_parse(client: httpx.Client) -> None:
    before = scrape(client)
    assert client.post("/v1/completions", json={"prompt": "metrics please", "max_tokens": 4}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "hi", "n": 0}).status_code == 400
    assert client.post("/v1/chat/completions", content=b"{oops").status_code == 400
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(client)
        # Published a step boundary after this test's request: its steps are in.
        if total(samples, "llm_replica_prompt_tokens") > total(before, "llm_replica_prompt_tokens") and \
                total(samples, "llm_replica_engine_steps") >= total(before, "llm_replica_engine_steps") + 4:
            break
        assert time.monotonic() < deadline, "replica stats never reached /metrics"
        time.sleep(0.2)
    for endpoint, status in (("completions", "200"), ("completions", "400"), ("chat", "400")):
        assert requests_total(samples, endpoint, status) == requests_total(before, endpoint, status) + 1
    ttft_count = [s.value for s in samples["llm_time_to_first_token_seconds"] if s.name.endswith("_count")]
    assert ttft_count and ttft_count[0] > 0
    assert any(s.name.endswith("_count") and s.value > 0 for s in samples["llm_inter_token_latency_seconds"])
    assert samples["llm_generation_tokens"][0].value > 0
    for name in ("llm_replica_kv_cache_usage_ratio", "llm_replica_prefix_cache_hit_rate", "llm_replica_waiting_requests"):
        (sample,) = samples[name]
        assert sample.labels["replica"].startswith("SERVE_REPLICA::single#LLMServer#")
    # Both loops' lag checks run (10 ms apart) once a request has come: counted, and small on an idle app.
    (replica_checks,) = [s for s in samples["llm_replica_event_loop_lag_checks"] if s.name.endswith("_total")]
    (ingress_checks,) = [s for s in samples["llm_ingress_event_loop_lag_checks"] if s.name.endswith("_total")]
    (ingress_lag,) = [s for s in samples["llm_ingress_event_loop_lag_seconds"] if s.name.endswith("_total")]
    assert replica_checks.value > 0 and ingress_checks.value > 0
    assert 0 <= ingress_lag.value < 0.5 * ingress_checks.value  # under half a second per 10 ms check
    # The engine's steps: one request of 4 tokens took at least 4, one of them with its prompt.
    steps = {name: total(samples, f"llm_replica_engine_{name}") - total(before, f"llm_replica_engine_{name}")
             for name in ("steps", "prompt_steps", "step_seqs")}
    assert steps["steps"] >= 4 and 1 <= steps["prompt_steps"] <= steps["steps"] <= steps["step_seqs"]
    # Garbage collections of both processes, timed: counts whole, seconds not more than a second each.
    for role in ("replica", "ingress"):
        (collections,) = [s for s in samples[f"llm_{role}_gc_collections"] if s.name.endswith("_total")]
        (seconds,) = [s for s in samples[f"llm_{role}_gc_pause_seconds"] if s.name.endswith("_total")]
        (full,) = [s for s in samples[f"llm_{role}_gc_full_collections"] if s.name.endswith("_total")]
        assert collections.value > 0 and collections.value == int(collections.value) and full.value <= collections.value
        assert 0 < seconds.value < collections.value
