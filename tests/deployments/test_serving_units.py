"""Request -> SamplingParams, outputs -> OpenAI bodies, error mapping: pure functions, no Ray."""

from __future__ import annotations

import pytest

from deployments.config import AppConfig
from deployments.errors import OpenAIError, from_validation_errors
from deployments.messages import ChoiceDelta, GenerateOutput, ModelInfo, RequestTiming
from deployments.protocol import ChatCompletionRequest, CompletionRequest
from deployments.serving import ChatShaper, CompletionShaper, Prompts, sampling_params
from engine.outputs import TokenLogprob

INFO = ModelInfo(max_model_len=100, vocab_size=50, block_size=16, prefix_index=None)
CONFIG = AppConfig(model="preset:tiny-llama")


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw)


def test_max_tokens_defaults_and_limits() -> None:
    assert sampling_params(CompletionRequest(prompt="x"), 10, INFO, CONFIG).max_tokens == 16
    assert sampling_params(chat(), 10, INFO, CONFIG).max_tokens == 90  # chat: the rest of the context
    assert sampling_params(chat(max_completion_tokens=5), 10, INFO, CONFIG).max_tokens == 5
    with_default = AppConfig(model="preset:tiny-llama", default_max_tokens=7)
    assert sampling_params(CompletionRequest(prompt="x"), 10, INFO, with_default).max_tokens == 7
    assert sampling_params(CompletionRequest(prompt="x", max_tokens=3), 10, INFO, with_default).max_tokens == 3
    assert sampling_params(CompletionRequest(prompt="x"), 95, INFO, CONFIG).max_tokens == 5  # the default shrinks
    with pytest.raises(OpenAIError) as err:
        sampling_params(CompletionRequest(prompt="x", max_tokens=91), 10, INFO, CONFIG)
    assert err.value.status == 400 and err.value.param == "max_tokens" and err.value.code == "context_length_exceeded"
    with pytest.raises(OpenAIError) as err:
        sampling_params(chat(), 100, INFO, CONFIG)
    assert err.value.param == "messages"


def test_sampling_fields_pass_through() -> None:
    req = CompletionRequest(prompt="x", temperature=0, top_p=0.5, top_k=-1, seed=3, stop="##", n=2, logprobs=1)
    p = sampling_params(req, 4, INFO, CONFIG)
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.n, p.logprobs) == (0, 0.5, 0, 3, ["##"], 2, 1)
    assert sampling_params(chat(logprobs=True, top_logprobs=3), 4, INFO, CONFIG).logprobs == 3
    assert sampling_params(chat(logprobs=True), 4, INFO, CONFIG).logprobs == 0
    assert sampling_params(chat(), 4, INFO, CONFIG).logprobs is None


def test_token_prompts_are_checked_against_the_vocabulary() -> None:
    prompts = Prompts(tokenizer=None)
    assert prompts.encode([1, 2], INFO) == [1, 2]
    with pytest.raises(OpenAIError, match="outside the vocabulary"):
        prompts.encode([1, 50], INFO)
    with pytest.raises(OpenAIError, match="no tokenizer"):
        prompts.encode("text", INFO)
    with pytest.raises(OpenAIError, match="no chat template"):
        prompts.chat(chat(), INFO)


def output(*choices: ChoiceDelta, finished: bool = False) -> GenerateOutput:
    return GenerateOutput("r", "replica", prompt_tokens=3, cached_tokens=0, choices=list(choices), finished=finished)


def test_merge_folds_deltas() -> None:
    total = output(ChoiceDelta(0, "a", [1]))
    total.merge(output(ChoiceDelta(1, "x", [7]), ChoiceDelta(0, "b", [2], finish_reason="length")))
    last = output(ChoiceDelta(1, "y", [8], finish_reason="stop"), finished=True)
    last.timing = RequestTiming(0.1, [0.01])
    total.merge(last)
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in total.choices] == [
        (0, "ab", [1, 2], "length"),
        (1, "xy", [7, 8], "stop"),
    ]
    assert total.finished and total.timing.time_to_first_token_s == 0.1 and total.num_generated_tokens == 4


def test_completion_shapes() -> None:
    req = CompletionRequest(prompt=["p", "q"], n=1, logprobs=1, echo=True)
    shaper = CompletionShaper(req, Prompts(None), "cmpl-1", "m")
    lp = [TokenLogprob(5, -0.5, {5: -0.5})]
    body = shaper.response(
        [output(ChoiceDelta(0, "A", [5], lp, "stop")), output(ChoiceDelta(0, "B", [6], None, "length"))], ["p", "q"]
    )
    assert [(c.index, c.text, c.finish_reason) for c in body.choices] == [(0, "pA", "stop"), (1, "qB", "length")]
    assert body.choices[0].logprobs.tokens == ["token_id:5"] and body.choices[0].logprobs.text_offset == [1]
    assert body.usage.prompt_tokens == 6 and body.usage.completion_tokens == 2


def test_chat_stream_shapes() -> None:
    shaper = ChatShaper(chat(), Prompts(None), "chatcmpl-1", "m")
    first = list(shaper.chunks(output(ChoiceDelta(0, "He", [1]))))
    last = list(shaper.chunks(output(ChoiceDelta(0, "y", [2], finish_reason="stop"), finished=True)))
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in first + last]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "He"}, None),
        ({"content": "y"}, None),
        ({}, "stop"),
    ]
    assert all("usage" not in c for c in first + last)
    assert shaper.usage_chunk(output(ChoiceDelta(0, "Hey", [1, 2])))["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "error,message,param",
    [
        ({"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}},
         "the body is not valid JSON: Expecting value", None),
        ({"type": "extra_forbidden", "loc": ("body", "foo"), "msg": "Extra inputs are not permitted"},
         "unrecognized request argument: foo", "foo"),
        ({"type": "missing", "loc": ("body", "prompt"), "msg": "Field required"}, "missing required parameter: prompt", "prompt"),
        ({"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be a valid dictionary"},
         "the body must be a JSON object", None),
        ({"type": "value_error", "loc": ("body",), "msg": "Value error, tools are not supported"},
         "tools are not supported", None),
        ({"type": "greater_than_equal", "loc": ("body", "n"), "msg": "Input should be greater than or equal to 1"},
         "n: Input should be greater than or equal to 1", "n"),
    ],
)
def test_validation_errors_become_openai_400s(error: dict, message: str, param: str | None) -> None:
    mapped = from_validation_errors([error])
    assert (mapped.status, mapped.message, mapped.param) == (400, message, param)
    assert set(mapped.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "open_streams, min_interval_s, expected",
    [(1, 0.0, 0.0005), (16, 0.0, 0.008), (256, 0.0, 0.128), (4, 0.05, 0.05), (0, 0.0, 0.0)],
)
def test_chunk_interval_grows_with_open_streams(open_streams: int, min_interval_s: float, expected: float) -> None:
    from deployments.llm_server import chunk_interval_s

    # 2000 chunks/s per replica over all streams: 256 streams -> each stream sends every 128 ms.
    assert chunk_interval_s(open_streams, min_interval_s, 2000.0) == pytest.approx(expected)


def test_end_timing_comment_round_trip():
    from deployments.server_timing import format_end_timing, parse_end_timing

    line = format_end_timing(RequestTiming(engine_finished_unix_s=10.25, replica_finished_unix_s=10.5), 11.0)
    assert line == ": end-timing engine=10.250000 replica=10.500000 ingress=11.000000\n\n"
    assert parse_end_timing(line.strip()) == {"engine": 10.25, "replica": 10.5, "ingress": 11.0}
    assert format_end_timing(None, 11.0) == ": end-timing ingress=11.000000\n\n"  # no timing from the replica
    assert parse_end_timing('data: {"id": 1}') == {} and parse_end_timing(": keep-alive") == {}


def test_server_timing_header_round_trip():
    from deployments.server_timing import add_handler_time, format_server_timing, parse_server_timing

    first = GenerateOutput("r", "replica", 3, 0, [ChoiceDelta(0, "a", [5])])
    assert format_server_timing(first, 100.0, 100.05) == "ingress;dur=50.0"  # no timing sent: only what the ingress saw
    first.timing = RequestTiming(time_to_first_token_s=0.03, arrived_unix_s=100.012)
    header = format_server_timing(first, 100.0, 100.05)
    assert header == "ingress;dur=50.0, route;dur=12.0, replica;dur=30.0"
    assert parse_server_timing(header) == {"ingress": 50.0, "route": 12.0, "replica": 30.0}
    assert parse_server_timing('cache;desc="hit", db;dur=2.5;desc=x') == {"db": 2.5}
    assert parse_server_timing(add_handler_time(header, 0.0625))["handler"] == 62.5
    first.timing = RequestTiming(time_to_first_token_s=0.03, arrived_unix_s=100.012, router_unix_s=100.004)
    assert format_server_timing(first, 100.0, 100.05) == "ingress;dur=50.0, route;dur=12.0, router;dur=4.0, replica;dur=30.0"
    assert format_server_timing(first, 100.0, 100.05, accepted_unix_s=100.014) == (
        "ingress;dur=50.0, route;dur=12.0, router;dur=4.0, accepted;dur=14.0, replica;dur=30.0"
    )
