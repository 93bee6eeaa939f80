"""A local Ray + Serve in its own process, driven over stdin/stdout by the reliability tests.

    python tests/reliability/serve_host.py --port 8123

Starts a fresh local Ray (never joins a running cluster) and Serve with HTTP
on 127.0.0.1:<port>, prints `@@ {"ready": ...}`, then answers one JSON
command per stdin line with one `@@ {...}` line on stdout:

    {"op": "deploy", "name": "basic", "args": {...}, "env": {"RAYLLM_API_KEY": "..."}}
        -> {"url": "http://127.0.0.1:<port>/basic"}   (env is set while the app is built)
    {"op": "delete", "name": "basic"}
    {"op": "kill", "actor": "SERVE_REPLICA::kill#LLMServer#abc"}   (ray.kill, no restart: Serve must replace it)
    {"op": "replicas", "name": "kill"}   -> {"replicas": {"LLMServer": {"RUNNING": 2}, ...}, "status": "RUNNING"}
    {"op": "quit"}

Keeping Ray out of the pytest process lets these tests run in one session
with the other Serve tests, which start their own Ray in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def reply(**body: Any) -> None:
    sys.stdout.write("@@ " + json.dumps(body) + "\n")
    sys.stdout.flush()


def deploy(port: int, name: str, args: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    from ray import serve

    from deployments.app import build_app

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        app = build_app(args)  # the config (and any key in the environment) is read here
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    serve.run(app, name=name, route_prefix=f"/{name}")
    return {"url": f"http://127.0.0.1:{port}/{name}"}


def replicas(name: str) -> dict[str, Any]:
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return {"status": "NOT_FOUND", "replicas": {}}
    return {
        "status": str(app.status.value if hasattr(app.status, "value") else app.status),
        "replicas": {
            dep: {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()} for dep, d in app.deployments.items()
        },
    }


def kill(actor: str) -> dict[str, Any]:
    import ray

    handle = ray.get_actor(actor, namespace="serve")
    ray.kill(handle, no_restart=True)
    return {"killed": actor}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--num-cpus", type=float, default=4)
    a = p.parse_args()

    import ray
    from ray import serve

    from deployments.ray_env import missing_serve_settings

    # More logical CPUs than cores: replicas mostly wait, and each asks for a fraction.
    os.environ.update(missing_serve_settings())  # the proxy takes its transport from the environment
    ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": a.port})
        reply(ready=True, gcs_address=ray.get_runtime_context().gcs_address)
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            op = cmd.get("op")
            try:
                if op == "quit":
                    reply(ok=True)
                    break
                if op == "deploy":
                    reply(ok=True, **deploy(a.port, cmd["name"], cmd["args"], cmd.get("env") or {}))
                elif op == "delete":
                    serve.delete(cmd["name"])
                    reply(ok=True)
                elif op == "kill":
                    reply(ok=True, **kill(cmd["actor"]))
                elif op == "replicas":
                    reply(ok=True, **replicas(cmd["name"]))
                else:
                    reply(ok=False, error=f"unknown op {op!r}")
            except Exception as exc:
                reply(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-3000:])
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
