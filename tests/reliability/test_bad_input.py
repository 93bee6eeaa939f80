"""Malformed bodies get a 4xx with a clear OpenAI error, and the server keeps serving.

A table of hand-picked bad bodies (wrong types, huge prompts, negative / NaN /
infinite / out-of-range numbers, unknown fields, invalid UTF-8, empty
messages, not JSON at all), then property-based fuzzing of both endpoints
with hypothesis: whatever the body, never a 5xx, and a good request right
after still gets its answer. Bounded: 50 + 25 + 25 examples, small max_tokens
(RELIABILITY_FUZZ_SCALE=10 runs ten times as many).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability_helpers import assert_serves

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "Write a function."}]


@pytest.fixture(scope="module")
def client(basic_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=basic_url, timeout=60) as c:
        yield c


def post(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    # json.dumps writes NaN / Infinity as JavaScript does; pydantic's parser reads them.
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=raw, headers={"content-type": "application/json"})


# (path, body, status, what the error must say: a param prefix, a code, or words of the message)
BAD: list[Any] = [
    # ----- not a JSON object -----
    pytest.param(COMPLETIONS, b"", 400, {"code": "invalid_json"}, id="empty-body"),
    pytest.param(COMPLETIONS, b"{prompt: hi}", 400, {"code": "invalid_json"}, id="not-json"),
    pytest.param(COMPLETIONS, b"[1, 2]", 400, {"message": "JSON object"}, id="json-array"),
    pytest.param(COMPLETIONS, b"null", 400, {"message": "JSON object"}, id="json-null"),
    pytest.param(COMPLETIONS, b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, {"code": "invalid_json"}, id="deeply-nested"),
    # ----- invalid UTF-8 / unpaired surrogates -----
    pytest.param(COMPLETIONS, b'{"prompt": "\xff\xfe abc"}', 400, {"code": "invalid_json"}, id="invalid-utf8"),
    pytest.param(COMPLETIONS, b'{"prompt": "\xc3"}', 400, {"code": "invalid_json"}, id="truncated-utf8"),
    pytest.param(CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, {"code": "invalid_json"}, id="lone-surrogate"),
    # ----- wrong types -----
    pytest.param(COMPLETIONS, {"prompt": 123}, 400, {"param": "prompt"}, id="prompt-number"),
    pytest.param(COMPLETIONS, {"prompt": None}, 400, {"param": "prompt"}, id="prompt-null"),
    pytest.param(COMPLETIONS, {"prompt": {"text": "hi"}}, 400, {"param": "prompt"}, id="prompt-object"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, 400, {"param": "max_tokens"}, id="max-tokens-string"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "max_tokens": 1.5}, 400, {"param": "max_tokens"}, id="max-tokens-fraction"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, 400, {"param": "temperature"}, id="temperature-string"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "n": [2]}, 400, {"param": "n"}, id="n-list"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "stop": 7}, 400, {"param": "stop"}, id="stop-number"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "stream": [True]}, 400, {"param": "stream"}, id="stream-list"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "seed": "abc"}, 400, {"param": "seed"}, id="seed-string"),
    pytest.param(CHAT, {"messages": "hello"}, 400, {"param": "messages"}, id="messages-string"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, {"param": "messages"}, id="content-number"),
    pytest.param(CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, {"param": "messages"}, id="unknown-role"),
    pytest.param(CHAT, {"messages": [["user", "hi"]]}, 400, {"param": "messages"}, id="message-list"),
    # ----- huge prompts -----
    pytest.param(COMPLETIONS, {"prompt": "x " * 300_000}, 400, {"code": "context_length_exceeded"}, id="huge-text-prompt"),
    pytest.param(COMPLETIONS, {"prompt": list(range(3, 4000)) * 25}, 400, {"code": "context_length_exceeded"}, id="huge-token-prompt"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": "word " * 200_000}]}, 400, {"code": "context_length_exceeded"}, id="huge-chat-message"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "max_tokens": 10**30}, 400, {"code": "context_length_exceeded"}, id="huge-max-tokens"),
    pytest.param(COMPLETIONS, {"prompt": [3, 10**30]}, 400, {"param": "prompt"}, id="token-id-out-of-range"),
    # ----- negative, NaN, infinite, out of range -----
    pytest.param(COMPLETIONS, {"prompt": "hi", "temperature": -0.5}, 400, {"param": "temperature"}, id="temperature-negative"),
    pytest.param(COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}', 400, {"param": "temperature"}, id="temperature-nan"),
    pytest.param(COMPLETIONS, b'{"prompt": "hi", "temperature": Infinity}', 400, {"param": "temperature"}, id="temperature-inf"),
    pytest.param(COMPLETIONS, b'{"prompt": "hi", "top_p": NaN}', 400, {"param": "top_p"}, id="top-p-nan"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "top_p": -1}, 400, {"param": "top_p"}, id="top-p-negative"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "top_k": -2}, 400, {"param": "top_k"}, id="top-k-negative"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "max_tokens": -5}, 400, {"param": "max_tokens"}, id="max-tokens-negative"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "n": -1}, 400, {"param": "n"}, id="n-negative"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "n": 1000}, 400, {"param": "n"}, id="n-huge"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "logprobs": -1}, 400, {"param": "logprobs"}, id="logprobs-negative"),
    pytest.param(COMPLETIONS, b'{"prompt": "hi", "presence_penalty": -Infinity}', 400, {"param": "presence_penalty"}, id="penalty-inf"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "stop_token_ids": [-1]}, 400, {"message": "stop_token_ids"}, id="stop-token-negative"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "seed": 2**80}, 400, {"message": "seed"}, id="seed-beyond-64-bit"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "seed": -(2**70)}, 400, {"message": "seed"}, id="seed-below-64-bit"),
    pytest.param(CHAT, {"messages": USER, "top_logprobs": 99, "logprobs": True}, 400, {"param": "top_logprobs"}, id="top-logprobs-huge"),
    # ----- unknown fields -----
    pytest.param(COMPLETIONS, {"prompt": "hi", "frobnicate": 1}, 400, {"param": "frobnicate"}, id="unknown-field"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True, "extra": 1}}, 400, {"param": "stream_options.extra"}, id="unknown-nested-field"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": "hi", "mood": "happy"}]}, 400, {"message": "mood"}, id="unknown-message-field"),
    # ----- empty -----
    pytest.param(CHAT, {"messages": []}, 400, {"param": "messages"}, id="empty-messages"),
    pytest.param(CHAT, {}, 400, {"param": "messages"}, id="no-messages"),
    pytest.param(COMPLETIONS, {}, 400, {"param": "prompt"}, id="no-prompt"),
    pytest.param(COMPLETIONS, {"prompt": ""}, 400, {"param": "prompt"}, id="empty-prompt"),
    pytest.param(COMPLETIONS, {"prompt": []}, 400, {"param": "prompt"}, id="empty-prompt-list"),
    pytest.param(COMPLETIONS, {"prompt": [[]]}, 400, {"param": "prompt"}, id="empty-token-list"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "stop": [""]}, 400, {"param": "stop"}, id="empty-stop-string"),
    # ----- unsupported or contradictory -----
    pytest.param(COMPLETIONS, {"prompt": ["a", "b"], "stream": True}, 400, {"param": "prompt"}, id="stream-several-prompts"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, {"message": "stream_options"}, id="stream-options-without-stream"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "model": "gpt-17"}, 404, {"code": "model_not_found"}, id="unknown-model"),
]


@pytest.mark.parametrize("path,body,status,expect", BAD)
def test_bad_body_is_a_clear_4xx_and_the_server_keeps_serving(
    client: httpx.Client, path: str, body: Any, status: int, expect: dict[str, str]
) -> None:
    r = post(client, path, body)
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert error["message"] and error["type"], error
    assert len(error["message"]) < 1000, "the message should not echo a huge body"
    if "param" in expect:
        assert (error["param"] or "").startswith(expect["param"]), error
    if "code" in expect:
        assert error["code"] == expect["code"], error
    if "message" in expect:
        assert expect["message"] in error["message"], error
    assert_serves(client)


def test_wrong_method_and_route(client: httpx.Client) -> None:
    r = client.get(COMPLETIONS)
    assert r.status_code == 405 and r.json()["error"]["message"]
    r = client.post("/v1/engines/demo/completions", json={"prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert_serves(client)


# ----- property-based fuzzing ----------------------------------------------------------------------

# Anything JSON can hold, small.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def field_values(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly plausible values of a field (valid or at its edges), sometimes anything at all."""
    return st.one_of(plausible, plausible, plausible, json_values)


SMALL_INTS = st.integers(min_value=-3, max_value=8)
EDGE_FLOATS = st.sampled_from([0.0, 0.5, 1.0, 2.0, 2.5, -0.1, 1e-9, 1e308, -0.0, float("nan"), float("inf")])
TOKEN_IDS = st.lists(st.integers(min_value=-2, max_value=4100), max_size=12)

SAMPLING_FIELDS: dict[str, st.SearchStrategy] = {
    "model": field_values(st.sampled_from(["demo", "", "other"])),
    "max_tokens": field_values(SMALL_INTS),
    "temperature": field_values(EDGE_FLOATS),
    "top_p": field_values(EDGE_FLOATS),
    "top_k": field_values(SMALL_INTS),
    "n": field_values(SMALL_INTS),
    "seed": field_values(st.integers(min_value=-(2**65), max_value=2**65)),
    "stop": field_values(st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3))),
    "stop_token_ids": field_values(TOKEN_IDS),
    "stream": field_values(st.booleans()),
    "stream_options": field_values(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "ignore_eos": field_values(st.booleans()),
    "presence_penalty": field_values(EDGE_FLOATS),
    "logit_bias": field_values(st.dictionaries(st.text(max_size=3), st.floats(-5, 5), max_size=2)),
    "user": field_values(st.text(max_size=8)),
}
COMPLETION_FIELDS = {
    **SAMPLING_FIELDS,
    "prompt": field_values(st.one_of(st.text(max_size=40), TOKEN_IDS, st.lists(st.text(max_size=10), max_size=3), st.lists(TOKEN_IDS, max_size=3))),
    "logprobs": field_values(st.integers(min_value=-1, max_value=21)),
    "echo": field_values(st.booleans()),
    "best_of": field_values(SMALL_INTS),
    "suffix": field_values(st.text(max_size=3)),
}
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"])},
    optional={"content": st.one_of(st.text(max_size=30), st.none(), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2)), "name": st.text(max_size=5)},
)
CHAT_FIELDS = {
    **SAMPLING_FIELDS,
    "messages": field_values(st.lists(MESSAGE, max_size=3)),
    "max_completion_tokens": field_values(SMALL_INTS),
    "logprobs": field_values(st.booleans()),
    "top_logprobs": field_values(st.integers(min_value=-1, max_value=21)),
    "response_format": field_values(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
    "tool_choice": field_values(st.sampled_from(["none", "auto", "required"])),
}


def bodies(fields: dict[str, st.SearchStrategy], required: str) -> st.SearchStrategy:
    """Objects with any subset of the known fields (the required one usually present), sometimes an unknown one."""
    known = st.fixed_dictionaries({required: fields[required]}, optional={k: v for k, v in fields.items() if k != required})
    unknown = st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k not in fields), json_values, max_size=1)
    return st.one_of(known, known, known, st.builds(lambda a, b: {**a, **b}, known, unknown), st.builds(lambda a, b: {**a, **b}, unknown, unknown))


SCALE = int(os.environ.get("RELIABILITY_FUZZ_SCALE", "1"))
FUZZ = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def check_answer(client: httpx.Client, path: str, body: dict[str, Any]) -> None:
    # Keep valid requests short: at most 8 new tokens (chat's default is the rest of the context).
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] > 8:
            body[key] = 8
    if path == CHAT and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 8
    r = post(client, path, body)
    assert r.status_code < 500, (body, r.status_code, r.text[:500])
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
            assert '"error"' not in r.text, r.text[-500:]
        else:
            assert r.json()["choices"], r.text[:500]
    else:
        assert 400 <= r.status_code < 500 and r.json()["error"]["message"], r.text[:500]


@settings(FUZZ, max_examples=50 * SCALE)
@given(body=bodies(COMPLETION_FIELDS, "prompt"))
def test_fuzz_completions_never_5xx(client: httpx.Client, body: dict[str, Any]) -> None:
    check_answer(client, COMPLETIONS, body)


@settings(FUZZ, max_examples=25 * SCALE)
@given(body=bodies(CHAT_FIELDS, "messages"))
def test_fuzz_chat_never_5xx(client: httpx.Client, body: dict[str, Any]) -> None:
    check_answer(client, CHAT, body)


@settings(FUZZ, max_examples=25 * SCALE)
@given(raw=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_fuzz_raw_bytes_never_5xx(client: httpx.Client, raw: bytes) -> None:
    r = post(client, COMPLETIONS, raw)
    assert r.status_code < 500, (raw, r.status_code, r.text[:300])
    if r.status_code != 200:
        assert r.json()["error"]["message"], r.text[:300]


def test_still_serving_after_fuzzing(client: httpx.Client) -> None:
    assert_serves(client)
    assert client.get("/health").status_code == 200
