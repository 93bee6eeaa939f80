"""The placement keys of `llm_server` / `ingress` (spread over nodes, multi-GPU replicas) and the API key from the environment.

Pure config: what `AppConfig` accepts and the `serve.deployment` options it makes.
"""

from __future__ import annotations

from typing import Any

import pytest

from deployments.config import API_KEY_ENV, parse_app_config


def llm_options(**llm: Any) -> dict[str, Any]:
    return parse_app_config({"model": "preset:tiny-llama", "llm_server": llm}).llm_server.serve_options()


def test_no_placement_keys_by_default() -> None:
    opts = llm_options()
    assert not {"max_replicas_per_node", "placement_group_bundles", "placement_group_strategy"} & opts.keys()


def test_max_replicas_per_node() -> None:
    opts = llm_options(num_replicas=2, max_replicas_per_node=1)
    assert opts["max_replicas_per_node"] == 1 and opts["num_replicas"] == 2


def test_multi_gpu_replica_gets_a_strict_pack_placement_group() -> None:
    opts = llm_options(
        ray_actor_options={"num_cpus": 2, "num_gpus": 1},
        placement_group_bundles=[{"CPU": 2, "GPU": 1}, {"GPU": 1}],
        placement_group_strategy="STRICT_PACK",
    )
    assert opts["placement_group_bundles"] == [{"CPU": 2.0, "GPU": 1.0}, {"GPU": 1.0}]
    assert opts["placement_group_strategy"] == "STRICT_PACK"


def test_placement_options_are_accepted_by_serve() -> None:
    from ray import serve

    from deployments.app import build_app

    app = build_app(
        {
            "model": "preset:tiny-llama",
            "llm_server": {
                "ray_actor_options": {"num_cpus": 1, "num_gpus": 2},
                "placement_group_bundles": [{"CPU": 1, "GPU": 2}],
                "placement_group_strategy": "STRICT_PACK",
            },
            "ingress": {"max_replicas_per_node": 1, "num_replicas": 2},
        }
    )
    assert isinstance(app, serve.Application)


@pytest.mark.parametrize(
    "llm,message",
    [
        ({"placement_group_strategy": "STRICT_PACK"}, "placement_group_strategy needs placement_group_bundles"),
        ({"placement_group_bundles": [{"CPU": 1}], "max_replicas_per_node": 1}, "max_replicas_per_node or placement_group_bundles"),
        ({"placement_group_bundles": [{"CPU": 0.5}]}, "placement_group_bundles[0], which has 0.5 CPU"),
        ({"ray_actor_options": {"num_gpus": 1}, "placement_group_bundles": [{"CPU": 1}, {"GPU": 1}]}, "which has 0 GPU"),
        ({"placement_group_bundles": [{}]}, "placement_group_bundles[0] must ask for some resource"),
        ({"placement_group_bundles": []}, "llm_server.placement_group_bundles"),
        ({"placement_group_bundles": [{"CPU": 1}], "placement_group_strategy": "TIGHT"}, "llm_server.placement_group_strategy"),
        ({"max_replicas_per_node": 0}, "llm_server.max_replicas_per_node"),
    ],
)
def test_bad_placement_names_the_field(llm: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_app_config({"model": "preset:tiny-llama", "llm_server": llm})
    assert message in str(err.value)


def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert parse_app_config({"model": "preset:tiny-llama"}).api_key is None
    monkeypatch.setenv(API_KEY_ENV, "sk-from-env")
    assert parse_app_config({"model": "preset:tiny-llama"}).api_key == "sk-from-env"
    assert parse_app_config({"model": "preset:tiny-llama", "api_key": None}).api_key == "sk-from-env"
    assert parse_app_config({"model": "preset:tiny-llama", "api_key": "sk-yaml"}).api_key == "sk-yaml"  # the yaml wins
    monkeypatch.setenv(API_KEY_ENV, "")
    assert parse_app_config({"model": "preset:tiny-llama"}).api_key is None
    with pytest.raises(ValueError, match="api_key must not be blank"):
        parse_app_config({"model": "preset:tiny-llama", "api_key": " "})
