"""A multi-node Ray cluster on one machine, and a rehearsal of serving on it.

    python -m cluster.local_cluster                 # the rehearsal below; exit 0 when every check holds
    python -m cluster.local_cluster --keep-logs     # keep the Ray logs and the generated serve configs

The rehearsal does what an operator does on a real cluster, with the real CLIs:

1. `ray start --head` and two `ray start --address ...` worker nodes, each in
   its own process session. The head gets custom resource `node_head`, the
   workers `node_a` / `node_b` and two logical GPUs each (nothing uses them:
   the demo model runs on the CPU, but the replicas ask for `num_gpus: 1` as
   on the GPU cluster, so they can only land on the workers).
2. `serve deploy` of serve_config.yaml's app (small CPU settings, HTTP on
   127.0.0.1, one proxy on the head) with `llm_server.max_replicas_per_node: 1`.
3. While a client keeps sending requests, scales LLMServer 1 -> 2 -> 1 with
   `serve deploy` of the same config with a `deployments:` override (a
   lightweight update: no replica restarts), and checks from Serve's REST API
   that the two replicas run on different worker nodes, that both answered,
   that scaling down kept a running replica, and that no request failed.
4. Stops every process it started (by the session ids of its `ray start`s).

Nothing else on the machine is touched: its own temp dir (so no
/tmp/ray/ray_current_cluster for other drivers to find), its own free ports,
token authentication with a token made here, HTTP and the dashboard on
127.0.0.1. Ray itself binds its internal gRPC ports on the host's address.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.ray_env import serve_process_env

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = PROJECT_ROOT / "serve_config.yaml"
APP = "llm"
LLM_DEPLOYMENT = "LLMServer"


class RehearsalError(RuntimeError):
    pass


def free_port(taken: set[int] | None = None) -> int:
    """A port free now; with `taken`, also one not handed out before (and then recorded there)."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if taken is None:
            return port
        if port not in taken:
            taken.add(port)
            return port


@dataclass(frozen=True)
class NodeSpec:
    name: str  # also its custom resource: {name: 1}
    num_cpus: float
    num_gpus: int = 0
    head: bool = False


DEFAULT_NODES = (
    NodeSpec("node_head", num_cpus=1, head=True),
    NodeSpec("node_a", num_cpus=1, num_gpus=2),
    NodeSpec("node_b", num_cpus=1, num_gpus=2),
)


@dataclass
class _Node:
    spec: NodeSpec
    proc: subprocess.Popen
    log: Path


class LocalCluster:
    """Ray head + worker nodes as `ray start --block` processes on this machine."""

    def __init__(
        self,
        workdir: Path,
        nodes: tuple[NodeSpec, ...] = DEFAULT_NODES,
        object_store_bytes: int = 100_000_000,
    ) -> None:
        if not nodes or not nodes[0].head or any(n.head for n in nodes[1:]):
            raise ValueError("the first node, and only it, must be the head")
        self.workdir = workdir
        self.specs = nodes
        self.object_store_bytes = object_store_bytes
        self._ports: set[int] = set()  # every port given to this cluster's processes: no two the same
        self.gcs_port = free_port(self._ports)
        self.dashboard_port = free_port(self._ports)
        self.token_path = workdir / "auth_token"
        self._nodes: list[_Node] = []

    # ----- addresses and environment ------------------------------------------------------

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def ray_temp_dir(self) -> Path:
        return self.workdir / "ray"

    def env(self) -> dict[str, str]:
        """The environment of every Ray process and CLI call of this cluster."""
        env = serve_process_env({k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")})
        env.update(
            RAY_TMPDIR=str(self.workdir),  # default temp dir of anything started here: never /tmp/ray
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONPATH=os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        )
        return env

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    # ----- start / stop --------------------------------------------------------------------

    def start(self, timeout_s: float = 120.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        deadline = time.monotonic() + timeout_s
        head, *workers = self.specs
        self._nodes.append(self._start_node(head))
        self._wait_for_log(self._nodes[0], "Ray runtime started", deadline)
        for spec in workers:
            # One at a time: nodes of one host that start together can race for the same socket names.
            self._nodes.append(self._start_node(spec))
            self._wait_for_log(self._nodes[-1], "Ray runtime started", deadline)
        while len(self.alive_nodes()) < len(self.specs):
            self.check_running()
            if time.monotonic() > deadline:
                raise RehearsalError(f"only {len(self.alive_nodes())} of {len(self.specs)} nodes alive after {timeout_s:.0f} s")
            time.sleep(1.0)

    def _start_node(self, spec: NodeSpec) -> _Node:
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = [
            ray, "start", "--block", "--disable-usage-stats",
            f"--num-cpus={spec.num_cpus:g}", f"--num-gpus={spec.num_gpus}",
            f"--resources={json.dumps({spec.name: 1})}",
            f"--object-store-memory={self.object_store_bytes}",
            # Explicit free ports: two nodes on one host must not meet on a default port.
            *(f"--{option}={free_port(self._ports)}" for option in (
                "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                "runtime-env-agent-port", "node-manager-port", "object-manager-port",
            )),
        ]
        if spec.head:
            cmd += [
                "--head", f"--port={self.gcs_port}", f"--temp-dir={self.ray_temp_dir}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port(self._ports)}",
            ]
        else:
            cmd += [f"--address={self.gcs_address}"]
        log = self.workdir / f"{spec.name}.log"
        with open(log, "w", encoding="utf-8") as out:
            proc = subprocess.Popen(
                cmd, cwd=PROJECT_ROOT, env=self.env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,  # its own session: stop() finds all it started
            )
        return _Node(spec, proc, log)

    def _wait_for_log(self, node: _Node, text: str, deadline: float) -> None:
        while text not in node.log.read_text(encoding="utf-8", errors="replace"):
            if node.proc.poll() is not None:
                raise RehearsalError(f"`ray start` of {node.spec.name} exited ({node.proc.returncode}):\n{tail(node.log)}")
            if time.monotonic() > deadline:
                raise RehearsalError(f"{node.spec.name} did not start in time:\n{tail(node.log)}")
            time.sleep(0.5)

    def check_running(self) -> None:
        for node in self._nodes:
            if node.proc.poll() is not None:
                raise RehearsalError(f"`ray start` of {node.spec.name} exited ({node.proc.returncode}):\n{tail(node.log)}")

    def stop(self, grace_s: float = 4.0) -> None:
        """SIGTERM to each `ray start --block` (it stops its node), then SIGKILL to what is left of their sessions."""
        sessions = [n.proc.pid for n in self._nodes]
        for node in reversed(self._nodes):
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and session_pids(sessions):
            time.sleep(0.5)
        for pid in session_pids(sessions):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for node in self._nodes:
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._nodes.clear()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- the dashboard's REST API ----------------------------------------------------------

    def get(self, path: str, timeout_s: float = 10.0) -> Any:
        request = urllib.request.Request(self.dashboard_url + path, headers=self.auth_headers())
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return json.loads(resp.read())

    def alive_nodes(self) -> dict[str, str]:
        """node id -> node name (its custom resource) of the live nodes; {} while the dashboard is not up."""
        try:
            data = self.get("/api/v0/nodes?limit=100")
        except (urllib.error.URLError, OSError, ValueError):
            return {}
        result = data.get("data", {}).get("result", {})
        rows = result.get("result", []) if isinstance(result, dict) else result
        names = {s.name for s in self.specs}
        out = {}
        for row in rows:
            if row.get("state") == "ALIVE":
                name = next((r for r in row.get("resources_total", {}) if r in names), "?")
                out[row["node_id"]] = name
        return out

    def serve_status(self) -> dict[str, Any]:
        return self.get("/api/serve/applications/")

    def serve_deploy(self, config: dict[str, Any], name: str) -> None:
        """`serve deploy <file> -a <dashboard>`, as on a real cluster."""
        import yaml

        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        serve = str(Path(sys.executable).with_name("serve"))
        done = subprocess.run(
            [serve, "deploy", str(path), "-a", self.dashboard_url], cwd=PROJECT_ROOT, env=self.env(),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        )
        if done.returncode != 0:
            raise RehearsalError(f"serve deploy {path.name} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def session_pids(session_ids: list[int]) -> list[int]:
    """Live processes in the given sessions (Ray's workers keep the session of the `ray start` that made them)."""
    wanted = set(session_ids)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[3]) in wanted:  # state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ----- the app on the rehearsal cluster --------------------------------------------------------


def rehearsal_config(http_port: int, llm_replicas: int | None = None) -> dict[str, Any]:
    """serve_config.yaml with CPU-sized settings for three small nodes; `llm_replicas` adds a deployments override."""
    import yaml

    config = yaml.safe_load(SERVE_CONFIG.read_text(encoding="utf-8"))
    config["proxy_location"] = "HeadOnly"  # one HTTP proxy: every node is on this one host
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    (app,) = [a for a in config["applications"] if a["import_path"] == "deployments.app:build_app"]
    app["name"], app["route_prefix"] = APP, "/"
    args = app["args"]
    args.update(device="cpu", max_model_len=512)
    args["cache"]["num_blocks"] = 128
    args["scheduler"].update(max_num_seqs=8, max_num_batched_tokens=512)
    args["llm_server"] = {
        "num_replicas": 1,
        "max_replicas_per_node": 1,  # spread: never two LLM replicas on one node
        "max_ongoing_requests": 8,
        "max_queued_requests": 64,
        # As on the GPU cluster: one GPU per replica (the workers' GPUs are logical here).
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1},
    }
    args["ingress"] = {
        "num_replicas": 1,
        # Pinned next to the proxy on the head by its custom resource.
        "ray_actor_options": {"num_cpus": 0.25, "resources": {"node_head": 0.1}},
    }
    if llm_replicas is not None:
        # Scaling without a restart: Serve applies this override in place; changing `args` rebuilds the app.
        app["deployments"] = [{"name": LLM_DEPLOYMENT, "num_replicas": llm_replicas}]
    return config


@dataclass
class Replica:
    replica_id: str  # Serve's short id
    actor_name: str  # = the x-replica-id header the app returns
    node_id: str
    state: str


def llm_replicas(cluster: LocalCluster) -> tuple[str, list[Replica]]:
    """(app status, LLMServer replicas) from Serve's REST API."""
    app = cluster.serve_status().get("applications", {}).get(APP)
    if not app:
        return "NOT_STARTED", []
    deployment = app.get("deployments", {}).get(LLM_DEPLOYMENT, {})
    replicas = [
        Replica(r["replica_id"], r.get("actor_name", ""), r.get("node_id") or "", r["state"])
        for r in deployment.get("replicas", [])
    ]
    return app["status"], replicas


def wait_for_replicas(cluster: LocalCluster, n: int, timeout_s: float) -> list[Replica]:
    """Waits until the app is RUNNING with exactly `n` RUNNING LLM replicas and none starting or stopping."""
    deadline = time.monotonic() + timeout_s
    last: tuple[str, list[Replica]] = ("?", [])
    while time.monotonic() < deadline:
        cluster.check_running()
        try:
            last = llm_replicas(cluster)
        except (urllib.error.URLError, OSError, ValueError):
            pass
        status, replicas = last
        if status == "RUNNING" and len(replicas) == n and all(r.state == "RUNNING" for r in replicas):
            return replicas
        if status == "DEPLOY_FAILED":
            break
        time.sleep(1.0)
    raise RehearsalError(f"wanted {n} running LLM replicas; Serve says {last[0]}: {last[1]}")


@dataclass
class TrafficResult:
    status: int  # HTTP status, 0: no answer
    replica: str  # x-replica-id, "" if none
    error: str = ""


class Traffic:
    """One client in a thread: completions back to back, bounded by count and time."""

    def __init__(self, url: str, max_requests: int = 2000, max_seconds: float = 300.0, timeout_s: float = 60.0) -> None:
        self.url = url
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.timeout_s = timeout_s
        self.results: list[TrafficResult] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> list[TrafficResult]:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 5)
        return list(self.results)

    def replicas_since(self, index: int) -> set[str]:
        return {r.replica for r in self.results[index:] if r.status == 200}

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        for i in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            self.results.append(self.one(i))

    def one(self, i: int) -> TrafficResult:
        # Varied prompts: with nothing cached, prefix-aware routing is power of two choices.
        body = {"model": "demo", "prompt": f"def function_{i}(x):", "max_tokens": 8, "temperature": 0}
        request = urllib.request.Request(
            f"{self.url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                answer = json.loads(resp.read())
                ok = bool(answer.get("choices")) and answer["usage"]["completion_tokens"] >= 1
                return TrafficResult(resp.status, resp.headers.get("x-replica-id", ""), "" if ok else "no tokens")
        except urllib.error.HTTPError as exc:
            return TrafficResult(exc.code, exc.headers.get("x-replica-id", ""), exc.read()[:200].decode(errors="replace"))
        except (urllib.error.URLError, OSError) as exc:
            return TrafficResult(0, "", f"{type(exc).__name__}: {exc}")


@dataclass
class Report:
    nodes: dict[str, str] = field(default_factory=dict)  # node id -> name
    steps: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    failures: int = 0
    seconds: float = 0.0

    def step(self, what: str, started: float, **details: Any) -> None:
        entry = {"step": what, "seconds": round(time.monotonic() - started, 1), **details}
        self.steps.append(entry)
        print(f"[{entry['seconds']:6.1f} s] {what} {json.dumps(details) if details else ''}", flush=True)


def wait_http(url: str, cluster: LocalCluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        cluster.check_running()
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RehearsalError(f"{url}/v1/models did not answer in {timeout_s:.0f} s")
        time.sleep(1.0)


def wait_for_both(traffic: Traffic, since: int, replicas: set[str], timeout_s: float) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while not replicas <= traffic.replicas_since(since) and time.monotonic() < deadline:
        time.sleep(0.5)
    return traffic.replicas_since(since)


def rehearse(cluster: LocalCluster, timeout_s: float = 170.0) -> Report:
    """Starts the cluster, deploys, scales 1 -> 2 -> 1 under traffic; raises RehearsalError when a check fails."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RehearsalError(f"the rehearsal ran past {timeout_s:.0f} s")
        return remaining

    report = Report()
    cluster.start(timeout_s=min(90.0, left()))
    report.nodes = cluster.alive_nodes()
    report.step("cluster up", t0, nodes=sorted(report.nodes.values()))
    workers = {nid for nid, name in report.nodes.items() if name != "node_head"}

    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    cluster.serve_deploy(rehearsal_config(http_port), "deploy-1")
    (first,) = wait_for_replicas(cluster, 1, left())
    wait_http(url, cluster, left())
    report.step("deployed", t0, replica=first.actor_name, node=report.nodes.get(first.node_id))
    if first.node_id not in workers:
        raise RehearsalError(f"the LLM replica is on {report.nodes.get(first.node_id)}, not on a GPU worker")

    traffic = Traffic(url, max_seconds=left()).start()
    try:
        cluster.serve_deploy(rehearsal_config(http_port, llm_replicas=2), "scale-2")
        two = wait_for_replicas(cluster, 2, left())
        nodes = [r.node_id for r in two]
        report.step("scaled to 2", t0, replicas={r.actor_name: report.nodes.get(r.node_id) for r in two})
        if len(set(nodes)) != 2 or not set(nodes) <= workers:
            raise RehearsalError(f"the two LLM replicas are not on two different worker nodes: {[report.nodes.get(n) for n in nodes]}")
        if first.replica_id not in {r.replica_id for r in two}:
            raise RehearsalError("scaling up restarted the first replica")
        since = len(traffic.results)
        seen = wait_for_both(traffic, since, {r.actor_name for r in two}, min(60.0, left()))
        report.step("both replicas answered", t0, seen=sorted(seen))
        if seen != {r.actor_name for r in two}:
            raise RehearsalError(f"answers came from {sorted(seen)}, not from both replicas {[r.actor_name for r in two]}")

        cluster.serve_deploy(rehearsal_config(http_port, llm_replicas=1), "scale-1")
        (kept,) = wait_for_replicas(cluster, 1, left())
        report.step("scaled to 1", t0, replica=kept.actor_name, node=report.nodes.get(kept.node_id))
        if kept.replica_id not in {r.replica_id for r in two}:
            raise RehearsalError("scaling down restarted the replicas instead of stopping one")
        since = len(traffic.results)
        end = time.monotonic() + min(5.0, left())
        while time.monotonic() < end and len(traffic.results) < since + 5:
            time.sleep(0.2)
        after = traffic.replicas_since(since)
        if after and after != {kept.actor_name}:
            raise RehearsalError(f"after scaling down, answers still came from {sorted(after)}")
    finally:
        results = traffic.stop()
    report.requests = len(results)
    failed = [r for r in results if r.status != 200 or r.error]
    report.failures = len(failed)
    report.seconds = round(time.monotonic() - t0, 1)
    by_replica = Counter(r.replica for r in results if r.status == 200)
    report.step("traffic", t0, requests=len(results), failures=len(failed), by_replica=dict(by_replica))
    if failed:
        raise RehearsalError(f"{len(failed)} of {len(results)} requests failed during scaling, e.g. {failed[:3]}")
    if len(results) < 10:
        raise RehearsalError(f"only {len(results)} requests went through during the rehearsal")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="Folder for Ray's temp dir, logs and configs (default: a new temp folder).")
    p.add_argument("--keep-logs", action="store_true", help="Keep the workdir (it is kept anyway when a check fails).")
    p.add_argument("--timeout", type=float, default=170.0, help="Seconds for the rehearsal, stopping not included.")
    a = p.parse_args(argv)
    # Short: Ray's unix socket paths live under it (at most 107 characters).
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="rlc-", dir="/tmp"))
    cluster = LocalCluster(workdir)
    ok = False

    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally below: the cluster is stopped

    signal.signal(signal.SIGTERM, terminate)
    try:
        report = rehearse(cluster, timeout_s=a.timeout)
        ok = True
        print("REHEARSAL " + json.dumps({"ok": True, **report.__dict__}), flush=True)
        print(f"OK: {report.requests} requests, {report.failures} failed, replicas spread over two nodes, {report.seconds} s")
        return 0
    except RehearsalError as exc:
        print(f"REHEARSAL FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        t = time.monotonic()
        cluster.stop()
        print(f"cluster stopped in {time.monotonic() - t:.1f} s", flush=True)
        if ok and not a.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs and configs: {workdir}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
