"""One local Ray + Serve for the reliability tests, in its own process (serve_host.py), and the apps on it.

The tests talk HTTP to 127.0.0.1 only; Ray-side actions (kill a replica, read
replica states) go through serve_host's stdin. Keeping Ray out of the pytest
process lets these tests share a session with the other Serve tests, which
start their own Ray in-process. The apps are listed in reliability_helpers.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from reliability_helpers import ServeHost, start_host  # noqa: E402


@pytest.fixture(scope="session")
def serve_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeHost]:
    host = start_host(tmp_path_factory.mktemp("reliability") / "serve_host.log")
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="module")
def basic_url(serve_host: ServeHost) -> str:
    return serve_host.app("basic")


@pytest.fixture(scope="module")
def tight_url(serve_host: ServeHost) -> str:
    return serve_host.app("tight")


@pytest.fixture(scope="module")
def kill_url(serve_host: ServeHost) -> Iterator[str]:
    yield serve_host.app("kill")
    serve_host.drop("kill")  # two LLM replicas: CPU the modules after this one need
