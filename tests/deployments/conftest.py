"""Shared fixtures: one tiny model, one local Ray + Serve for this folder's tests (start-up is the cost).

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


class SharedServe:
    """The local Ray + Serve of these tests: started on first use, stopped once pytest leaves this
    folder (idle, its processes would take CPU from every test after it)."""

    def __init__(self) -> None:
        self._cluster: ServeCluster | None = None

    def get(self) -> ServeCluster:
        if self._cluster is None:
            import ray
            from ray import serve

            from deployments.ray_env import missing_serve_settings

            port = free_port()
            os.environ.update(missing_serve_settings())  # the proxy takes its transport from the environment
            # More logical CPUs than cores: replicas mostly wait, and each asks for a fraction.
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            self._cluster = ServeCluster(f"http://127.0.0.1:{port}")
        return self._cluster

    def stop(self) -> None:
        if self._cluster is not None:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
            self._cluster = None


SHARED_SERVE = pytest.StashKey[SharedServe]()
HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def shared_serve(request: pytest.FixtureRequest) -> Iterator[SharedServe]:
    shared = request.session.stash.setdefault(SHARED_SERVE, SharedServe())
    yield shared
    shared.stop()


@pytest.fixture(scope="module")
def serve_cluster(shared_serve: SharedServe) -> ServeCluster:
    return shared_serve.get()


@pytest.hookimpl(trylast=True)  # after the item's module fixtures are torn down (their apps deleted)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if nextitem is not None and HERE in Path(nextitem.path).parents:
        return
    shared = item.session.stash.get(SHARED_SERVE, None)
    if shared is not None:
        shared.stop()
