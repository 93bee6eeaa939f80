"""The app with several decode steps per launch (num_scheduler_steps), through HTTP and the openai client.

Async scheduling is forced on (the CPU's default is off) so the engine core runs the decode
passes after each launch; every answer must equal the engine with one step per launch.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy_helpers import ServeCluster, app_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

APP = "steps"
STEPS = 4


@pytest.fixture(scope="module")
def base_url(serve_cluster: ServeCluster, tiny_model: Path) -> Iterator[str]:
    url = serve_cluster.deploy(APP, app_args(tiny_model, async_scheduling=True, num_scheduler_steps=STEPS))
    yield url
    serve_cluster.delete(APP)


@pytest.fixture(scope="module")
def reference(tiny_model: Path):
    """The app's engine with one step per launch, in this process."""
    from deployments.config import parse_app_config
    from engine import LLMEngine

    config = parse_app_config(app_args(tiny_model, async_scheduling=True)).to_engine_config()
    return LLMEngine(config)


def expected(reference, prompt: str, max_tokens: int, **params):
    from engine import SamplingParams

    ids = reference.tokenize(prompt)
    return reference.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0, **params))[0].outputs[0]


def test_streams_equal_one_step_per_launch(base_url: str, reference) -> None:
    import openai

    oa = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    prompts = ["def fibonacci(n):", "Ray Serve routes requests", "The quick brown fox", "import torch"]
    lengths = [13, 7, 1, 22]  # not multiples of the steps: the last launch of each is cut at its limit

    def stream(prompt: str, n: int) -> tuple[str, list[str], int]:
        chunks = list(oa.completions.create(
            model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True, stream_options={"include_usage": True}
        ))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return text, reasons, chunks[-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(stream, prompts, lengths))
    for (text, reasons, tokens), prompt, n in zip(got, prompts, lengths):
        want = expected(reference, prompt, n)
        assert (text, reasons, tokens) == (want.text, [want.finish_reason], len(want.token_ids))


def test_stop_string_mid_launch(base_url: str, reference) -> None:
    import openai

    oa = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    prompt = "def fibonacci(n):"
    full = expected(reference, prompt, 20, ignore_eos=True).text
    stop = full[5:8]
    comp = oa.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    want = expected(reference, prompt, 20, stop=[stop])
    assert comp.choices[0].text == want.text == full[: full.find(stop)]
    assert comp.choices[0].finish_reason == "stop"
