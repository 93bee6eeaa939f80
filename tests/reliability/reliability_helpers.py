"""Helpers of the reliability tests: the serve_host process, the apps on it, HTTP and /metrics helpers.

Apps (the bundled demo model on the CPU, deployed on first use, deleted with the host):

    basic   one replica, roomy: bad input, fuzzing, client disconnects
    tight   one replica, 24 KV blocks of 16 tokens, 4 running + 2 queued requests at most,
            API key from $RAYLLM_API_KEY: overload, KV exhaustion and preemption, authentication
    kill    two replicas, plain power-of-two routing: a replica killed mid-load
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HOST_SCRIPT = Path(__file__).with_name("serve_host.py")
TIGHT_KEY = "sk-reliability-tight"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(**overrides: Any) -> dict[str, Any]:
    """The demo model with small CPU settings; `overrides` replace top-level keys."""
    args: dict[str, Any] = {
        "model": "models/demo-target",
        "served_model_name": "demo",
        "device": "cpu",
        "max_model_len": 2048,
        "cache": {"num_blocks": 256},
        "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 1024},
        "router": {"publish_interval_s": 0.05},
        "llm_server": {
            "num_replicas": 1, "max_ongoing_requests": 16, "max_queued_requests": 64,
            "ray_actor_options": {"num_cpus": 0.5},
        },
        "ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
    }
    args.update(overrides)
    return args


APPS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {  # name -> (args, environment while building)
    "basic": (app_args(), {}),
    "tight": (
        app_args(
            max_model_len=256,
            cache={"block_size": 16, "num_blocks": 24},
            scheduler={"max_num_seqs": 8, "max_num_batched_tokens": 256},
            llm_server={
                "num_replicas": 1, "max_ongoing_requests": 4, "max_queued_requests": 2,
                "ray_actor_options": {"num_cpus": 0.5},
            },
        ),
        {"RAYLLM_API_KEY": TIGHT_KEY},
    ),
    "kill": (
        app_args(
            router={"prefix_aware": False, "publish_interval_s": 0.05},
            llm_server={
                "num_replicas": 2, "max_ongoing_requests": 16, "max_queued_requests": 64,
                "ray_actor_options": {"num_cpus": 0.5},
                "health_check_period_s": 2, "health_check_timeout_s": 10, "graceful_shutdown_timeout_s": 5,
            },
        ),
        {},
    ),
}


class HostError(RuntimeError):
    pass


@dataclass
class ServeHost:
    proc: subprocess.Popen
    port: int
    log: Path
    _replies: queue.Queue = field(default_factory=queue.Queue)
    _urls: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start_reader(self) -> None:
        def read() -> None:
            with open(self.log, "a", encoding="utf-8") as log:
                for line in self.proc.stdout:
                    if line.startswith("@@ "):
                        self._replies.put(json.loads(line[3:]))
                    else:
                        log.write(line)
                        log.flush()
            self._replies.put({"ok": False, "error": "serve_host exited", "exited": True})

        threading.Thread(target=read, name="serve_host-reader", daemon=True).start()

    def wait_reply(self, timeout_s: float) -> dict[str, Any]:
        try:
            reply = self._replies.get(timeout=timeout_s)
        except queue.Empty:
            raise HostError(f"serve_host gave no answer in {timeout_s:.0f} s; log: {self.log}") from None
        if not reply.get("ok", True):
            raise HostError(f"{reply.get('error')}\n{reply.get('trace', '')}\nlog: {self.log}")
        return reply

    def call(self, op: str, timeout_s: float = 120.0, **kwargs: Any) -> dict[str, Any]:
        with self._lock:
            if self.proc.poll() is not None:
                raise HostError(f"serve_host exited ({self.proc.returncode}); log: {self.log}")
            self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self.proc.stdin.flush()
            return self.wait_reply(timeout_s)

    def app(self, name: str) -> str:
        """The base URL of app `name` (see APPS), deployed on first use."""
        if name not in self._urls:
            args, env = APPS[name]
            self._urls[name] = self.call("deploy", timeout_s=180, name=name, args=args, env=env)["url"]
        return self._urls[name]

    def drop(self, name: str) -> None:
        """Deletes app `name` (a later app() deploys it again)."""
        if self._urls.pop(name, None) is not None:
            self.call("delete", name=name)

    def kill(self, actor: str) -> None:
        self.call("kill", actor=actor)

    def replicas(self, name: str) -> dict[str, Any]:
        return self.call("replicas", name=name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit", timeout_s=60)
            except HostError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
        # Whatever is left of the Ray it started (same session), by pid.
        from cluster.local_cluster import session_pids

        deadline = time.monotonic() + 10
        while session_pids([self.proc.pid]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in session_pids([self.proc.pid]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_host(log: Path, timeout_s: float = 120.0) -> ServeHost:
    """serve_host.py in a new session, up and ready (Ray + Serve started)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYLLM_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            [sys.executable, str(HOST_SCRIPT), "--port", str(port)], cwd=REPO, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, bufsize=1,
            start_new_session=True,  # its Ray processes share this session: stop() finds them
        )
    host = ServeHost(proc, port, log)
    host.start_reader()
    try:
        host.wait_reply(timeout_s=timeout_s)  # {"ready": true}
    except BaseException:
        host.stop()
        raise
    return host


# ----- HTTP, SSE and /metrics -------------------------------------------------------------------


GOOD_BODY = {"model": "demo", "prompt": "def add(a, b):", "max_tokens": 2, "temperature": 0}


def assert_serves(client: Any, headers: dict[str, str] | None = None) -> None:
    """The server still answers a good request (client: an httpx.Client on an app's base URL)."""
    r = client.post("/v1/completions", json=GOOD_BODY, headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def sse_data(line: str) -> Any | None:
    """The payload of one `data:` line ("[DONE]" or the decoded JSON); None for other lines."""
    if not line.startswith("data: "):
        return None
    data = line.removeprefix("data: ")
    return data if data == "[DONE]" else json.loads(data)


def scrape(client: Any) -> dict[str, list[Any]]:
    """GET /metrics, parsed: metric family name -> samples."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def replica_values(samples: dict[str, list[Any]], family: str, sample: str | None = None) -> dict[str, float]:
    """replica label -> value of one per-replica family (e.g. llm_replica_kv_cache_usage_ratio)."""
    return {s.labels["replica"]: s.value for s in samples.get(family, []) if sample is None or s.name == sample}


def wait_for_metrics(client: Any, check: Any, timeout_s: float, what: str) -> dict[str, list[Any]]:
    """Scrapes /metrics until check(samples) is true; fails with the last numbers after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(client)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            shown = {k: [(s.labels, s.value) for s in v] for k, v in samples.items() if k.startswith("llm_replica_")}
            raise AssertionError(f"/metrics never showed {what} in {timeout_s:.0f} s: {shown}")
        time.sleep(0.2)
