"""SamplingParams: normalisation of the OpenAI-style fields and rejection of bad values."""

from __future__ import annotations

import math

import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams


def test_defaults_and_normalisation():
    p = SamplingParams(stop="END", stop_token_ids=(5, 6), top_k=-1)
    assert p.stop == ["END"]
    assert p.stop_token_ids == [5, 6]
    assert p.top_k == 0
    assert not p.greedy
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0, top_p=1.0, top_k=5, seed=3, logprobs=0).logprobs == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 1.5),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 2.0),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", True),
        ("temperature", "1"),
        ("top_k", -2),
        ("top_k", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("seed", "7"),
        ("logprobs", -1),
        ("logprobs", 21),
        ("stop", [""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["x"]),
    ],
)
def test_bad_values_raise_invalid_request_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})
    # The same value set after construction is caught by validate(), which the engine calls.
    params = SamplingParams()
    setattr(params, field, value)
    with pytest.raises(InvalidRequestError, match=field):
        params.validate()


def test_invalid_request_error_is_a_value_error():
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
