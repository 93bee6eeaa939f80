"""Serve the app on a fresh local Ray, HTTP on loopback only, until SIGINT / SIGTERM.

    python -m loadtest.serve_local --port 8000                  # serve_config.yaml's app (the demo model)
    python -m loadtest.serve_local --set device=cuda --set llm_server.ray_actor_options.num_gpus=1

This is the server half of `loadtest/run_local.py` and of the load test's own
test; users normally run `serve run serve_config.yaml` instead. It takes the
app's `args` from a serve config (default: the project's serve_config.yaml; the
application whose import path is `deployments.app:build_app`), applies `--set`
overrides, starts a new Ray (never joins a running cluster), serves HTTP on
127.0.0.1:<port> whatever the config's http_options say, and prints
`READY <url>` once every deployment is up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "serve_config.yaml"


def app_args(config: str | None, sets: list[str], args_json: str | None = None) -> dict[str, Any]:
    """The app's args: the config's (or the demo defaults), then `--args-json`, then each `--set key.path=value`."""
    import yaml

    if config is None and DEFAULT_CONFIG.is_file():
        config = str(DEFAULT_CONFIG)
    if config:
        doc = yaml.safe_load(Path(config).read_text()) or {}
        apps = doc.get("applications") or []
        if not apps:
            raise ValueError(f"{config}: no applications")
        app = next((a for a in apps if str(a.get("import_path", "")).endswith(":build_app")), apps[0])
        args = json.loads(json.dumps(app.get("args") or {}))
    else:
        args = {"model": "models/demo-target"}
    if args_json:
        args.update(json.loads(args_json))
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad --set {item!r}: use key.path=value")
        set_dotted(args, key, yaml.safe_load(value))
    return args


def set_dotted(args: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = args
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {part!r} is not a mapping")
    node[leaf] = value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", help="Serve config yaml to take the app's args from (default: serve_config.yaml).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override one arg (dotted path, yaml value).")
    p.add_argument("--args-json", help="Args to merge (a JSON object), before --set.")
    p.add_argument("--num-cpus", type=float, default=None, help="Logical CPUs of the local Ray (default: the cores).")
    a = p.parse_args(argv)
    args = app_args(a.config, a.set, a.args_json)

    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.ray_env import missing_serve_settings

    print(f"app args: {json.dumps(args)}", flush=True)
    app = build_app(args)  # validates the args before Ray starts
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Ray's processes inherit this process's environment: Serve's settings must be there first.
    os.environ.update(missing_serve_settings())
    ray.init(
        address="local",
        num_cpus=a.num_cpus,
        include_dashboard=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": a.port})
        serve.run(app, name="default", route_prefix="/")
        print(f"READY http://127.0.0.1:{a.port}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        print("shutting down", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
