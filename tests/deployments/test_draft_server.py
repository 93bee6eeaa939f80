"""The draft as its own deployment: the proposer adapter alone, then through a real local Serve.

Greedy output through the remote draft must equal the engine's output
without speculation, token for token; a draft that fails costs only
speculation, never a request.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deployments.draft_server import DraftServer, RemoteDraftProposer, draft_server_kwargs
from engine import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SpeculativeConfig
from engine.spec.draft_service import DraftService

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (1, 6, 19, 40)]


def engine_for(model: Path, proposer=None) -> LLMEngine:
    spec = SpeculativeConfig(method="remote", num_speculative_tokens=3) if proposer else SpeculativeConfig()
    config = EngineConfig(model=str(model), dtype="float32", device="cpu", cache=CacheConfig(block_size=4, num_blocks=256), speculative=spec)
    return LLMEngine(config, proposer=proposer)


class LocalHandle:
    """Stands in for a DeploymentHandle: handle.propose.remote(...).result()."""

    def __init__(self, service: DraftService | None) -> None:
        self.service, self.calls, self.propose = service, [], self

    def remote(self, calls, release):
        self.calls.append((calls, release))
        service = self.service

        class Response:
            def result(self, timeout_s=None):
                if service is None:
                    raise TimeoutError("no draft server")
                return service.propose(calls, release)

        return Response()


@pytest.fixture(scope="module")
def spec_model(tmp_path_factory) -> Path:
    """A tiny Llama whose logits are spread enough that no argmax is a float-noise tie (vocab 384)."""
    from engine.model.presets import save_hf_checkpoint

    return save_hf_checkpoint("tiny-llama", tmp_path_factory.mktemp("spec-model"), seed=0, initializer_range=0.2)


@pytest.fixture(scope="module")
def reference(spec_model: Path) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in engine_for(spec_model).generate(_prompts(), GREEDY)]


def test_remote_proposer_equals_no_speculation(spec_model, reference):
    service = DraftService(str(spec_model), 3, dtype="float32", device="cpu", block_size=4, num_blocks=128)
    handle = LocalHandle(service)
    engine = engine_for(spec_model, RemoteDraftProposer(handle, 3, 384))
    out = engine.generate(_prompts(), GREEDY)
    assert [o.outputs[0].token_ids for o in out] == reference
    assert engine.stats().spec_proposer == "remote" and engine.stats().spec_acceptance_rate == 1.0  # self-draft
    # Finished sequences are released with the next call, and only then.
    engine.generate(_prompts()[:1], GREEDY)
    released = [key for _, release in handle.calls for key in release]
    assert len(released) == len(_prompts())
    assert service.num_sequences == 1


def test_failing_draft_server_only_costs_speculation(spec_model, reference):
    proposer = RemoteDraftProposer(LocalHandle(None), 3, 384)
    engine = engine_for(spec_model, proposer)
    assert [o.outputs[0].token_ids for o in engine.generate(_prompts(), GREEDY)] == reference
    assert proposer.num_failures > 0 and engine.stats().spec_steps == 0


def test_draft_server_kwargs_from_app_config(tiny_model):
    from deployments.config import parse_app_config

    config = parse_app_config(
        {"model": str(tiny_model), "speculative": {"method": "draft", "draft_model": str(tiny_model), "num_speculative_tokens": 5}}
    )
    kwargs = draft_server_kwargs(config)
    assert kwargs["model"] == str(tiny_model) and kwargs["num_speculative_tokens"] == 5
    assert kwargs["vocab_size"] == 384 and kwargs["block_size"] == config.cache.block_size


# ----- through Ray Serve -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def draft_handle(serve_cluster, spec_model) -> Iterator:
    from ray import serve

    app = DraftServer.options(ray_actor_options={"num_cpus": 0.5}).bind(
        model=str(spec_model), num_speculative_tokens=3, dtype="float32", device="cpu", block_size=4, num_blocks=256
    )
    handle = serve.run(app, name="draft-test", route_prefix=None)
    yield handle
    serve.delete("draft-test")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_served_draft_equals_no_speculation(draft_handle, spec_model, reference):
    info = draft_handle.info.remote().result(timeout_s=60)
    assert info["vocab_size"] == 384 and info["num_speculative_tokens"] == 3
    engine = engine_for(spec_model, RemoteDraftProposer(draft_handle, 3, 384, timeout_s=60))
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_tokens=20, temperature=temperature, ignore_eos=True)
        out = engine.generate(_prompts(), params)
        if temperature == 0:
            assert [o.outputs[0].token_ids for o in out] == reference
        assert all(len(o.outputs[0].token_ids) == 20 for o in out)
    stats = engine.stats()
    assert stats.spec_steps > 0 and stats.spec_accepted_tokens > 0
    assert draft_handle.info.remote().result(timeout_s=60)["num_sequences"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_app_with_remote_draft_answers_like_the_engine_without_it(serve_cluster, spec_model, reference):
    """speculative.method: remote wires a DraftServer deployment into the app; greedy HTTP output is unchanged."""
    import httpx

    from tests.deployments.deploy_helpers import app_args

    args = app_args(spec_model, cache={"block_size": 4, "num_blocks": 256}, dtype="float32")
    args["speculative"] = {"method": "remote", "draft_model": str(spec_model), "num_speculative_tokens": 3}
    args["draft_server"] = {"ray_actor_options": {"num_cpus": 0.5}}
    base = serve_cluster.deploy("remote-spec", args)
    try:
        for prompt, expected in zip(_prompts(), reference):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True, "logprobs": 0}
            resp = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
            assert resp.status_code == 200, resp.text
            tokens = [int(t.removeprefix("token_id:")) for t in resp.json()["choices"][0]["logprobs"]["tokens"]]
            assert tokens == expected
    finally:
        serve_cluster.delete("remote-spec")
