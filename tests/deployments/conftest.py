"""Shared fixtures: one tiny model, one local Ray + Serve for the whole session (start-up is the cost).

Each test module deploys its own app under its own route prefix and deletes
it at the end, so modules can run alone or together.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from deploy_helpers import ServeCluster, build_tiny_model, free_port  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # Ray Serve's own pydantic models warn on import; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:ray.*")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def serve_cluster() -> Iterator[ServeCluster]:
    import ray
    from ray import serve

    from deployments.ray_env import missing_serve_settings

    port = free_port()
    # More logical CPUs than cores: replicas mostly wait, and each asks for a fraction.
    os.environ.update(missing_serve_settings())  # the proxy takes its transport from the environment
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield ServeCluster(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()
