"""Ingress replicas serving HTTP themselves (ingress_direct_http), beside Serve's proxy."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from deploy_helpers import QUICK_STOP, ServeCluster, free_port
from deployments.direct_http import reuseport_socket


def test_two_sockets_share_a_port_and_a_plain_one_cannot() -> None:
    first = reuseport_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = reuseport_socket("127.0.0.1", port)
    plain = socket.socket()
    try:
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    finally:
        for s in (first, second, plain):
            s.close()


@pytest.fixture(scope="module")
def direct_url(serve_cluster: ServeCluster, tiny_model: Path) -> Iterator[str]:
    port = free_port()
    serve_cluster.deploy(
        "direct",
        {
            "model": str(tiny_model),
            "served_model_name": "tiny",
            "device": "cpu",
            "dtype": "float32",
            "speculative": {"method": "none"},
            "cache": {"num_blocks": 128},
            "ingress": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}, **QUICK_STOP},
            "llm_server": {"ray_actor_options": {"num_cpus": 0.5}, **QUICK_STOP},
            "ingress_direct_http": {"host": "127.0.0.1", "port": port},
        },
    )
    yield f"http://127.0.0.1:{port}"
    serve_cluster.delete("direct")  # its replicas would take CPU from the modules after this one


def test_the_api_answers_on_the_shared_port(direct_url: str) -> None:
    client = openai.OpenAI(base_url=direct_url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="Hello world", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 5
    streamed = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(streamed)
    assert chunks[-1].usage.completion_tokens == 4


def test_errors_have_the_openai_shape(direct_url: str) -> None:
    r = httpx.post(direct_url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(direct_url + "/v1/completions", json={"model": "other", "prompt": "x"}, timeout=30)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(direct_url + "/nope", timeout=30).status_code == 404


def test_both_ingress_replicas_hold_the_port(direct_url: str) -> None:
    # A replica that could not bind the shared port fails its start: both running means both listen.
    from ray import serve

    replicas = serve.status().applications["direct"].deployments["OpenAIIngress"].replica_states
    assert {str(getattr(k, "value", k)): v for k, v in replicas.items()} == {"RUNNING": 2}
