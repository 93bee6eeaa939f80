"""`serve run` on the shipped serve_config.yaml (bundled demo model), as a user would.

Only the port and the backpressure limits are edited, so the same run also
shows overload answered by quick 503s rather than a growing queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from deploy_helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def _children_hear_ctrl_c() -> Iterator[None]:
    """A pytest started in the background by a non-interactive shell (CI's, for one) ignores SIGINT,
    and a child inherits an ignored signal: `serve run` then never saw the Ctrl-C and was killed after
    the full grace time. A handler of ours is reset to the default in a child at exec: set one while
    the child starts (no preexec_fn: this process runs Ray's threads)."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    llm = config["applications"][0]["args"]["llm_server"]
    llm["max_ongoing_requests"] = 2
    llm["max_queued_requests"] = 2
    llm["autoscaling"]["target_ongoing_requests"] = 2
    folder = tmp_path_factory.mktemp("serve_run")
    path = folder / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    log = (folder / "serve_run.log").open("w")
    serve = Path(sys.executable).with_name("serve")
    with _children_hear_ctrl_c():
        proc = subprocess.Popen(
            [str(serve), "run", str(path)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, f"serve run exited early; see {folder / 'serve_run.log'}"
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not up after 150 s; see {folder / 'serve_run.log'}"
            time.sleep(1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # serve run shuts Serve and its Ray down on Ctrl-C
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_serve_run_answers(served: str) -> None:
    assert httpx.get(f"{served}/v1/models").json()["data"][0]["id"] == "demo"
    r = httpx.post(
        f"{served}/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "Write a function that adds two numbers."}],
              "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] >= 1


def test_overload_is_a_quick_503(served: str) -> None:
    """2 running + 2 queued fit; most of 16 simultaneous requests are refused at once.

    (Not exactly 12: on a busy machine the burst reaches the ingress spread out,
    and an early request may finish before a late one arrives.)
    """

    async def one(c: httpx.AsyncClient) -> tuple[int, float, dict]:
        start = time.monotonic()
        r = await c.post("/v1/completions", json={"prompt": "import os\n", "max_tokens": 64, "ignore_eos": True})
        return r.status_code, time.monotonic() - start, r.json()

    async def burst() -> list[tuple[int, float, dict]]:
        async with httpx.AsyncClient(base_url=served, timeout=120) as c:
            return await asyncio.gather(*(one(c) for _ in range(16)))

    results = asyncio.run(burst())
    codes = sorted(code for code, _, _ in results)
    assert codes.count(200) >= 2 and codes.count(503) >= 6, codes
    slowest_ok = max(t for code, t, _ in results if code == 200)
    for code, elapsed, body in results:
        if code == 503:
            assert body["error"]["code"] == "overloaded"
            assert elapsed < slowest_ok / 2, (elapsed, slowest_ok)
    # Once the burst is over, the server answers normally again.
    ok = httpx.post(f"{served}/v1/completions", json={"prompt": "def f():", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
