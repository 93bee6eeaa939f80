"""Environment for the Ray processes that run this app: Serve reads some settings only from there.

Ray Serve's HTTP proxy picks its transport to the ingress replicas at start, from
RAY_SERVE_PROXY_USE_GRPC; no application config reaches it. gRPC passes each request and
stream chunk by value and, on an H100 host under 256 streams, cut the proxy's CPU per
request by a third (BENCHMARKS.md, W2). Ray also starts its workers, and so every replica and
the engine core each LLM replica spawns, at nice 15 (RAY_worker_niceness) unless told
otherwise: on a host where anything else at nice 0 wants a core, the engine's step loop then
waits behind it; serving processes are what this host is for, so they run at 0. And each
replica runs its handlers on Serve's own event loop, not on a second loop in another thread
(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0): every request and every stream chunk otherwise
crosses between the two loops, and under the GIL that handoff was what the LLM replica spent
its core on. On an H100 host at 256 streams it took the Serve path from 33.7k to 52.8k tok/s in
one run, side by side; two later runs with it as the default gave 37.3k and 39.0k (BENCHMARKS.md, W2). Our handlers never block their loop, which this needs. `make serve`
sets the same variables on the command line; launchers in this repo that start Ray call
`serve_process_env`. One setting is per process and not an environment variable: the GIL's
switch interval, which each replica sets for itself at start (`set_switch_interval`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

_DEFAULTS = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_worker_niceness": "0",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


def serve_process_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: os.environ) with this app's Serve settings added where `base` leaves them unset,
    so a user's own choice (e.g. RAY_SERVE_PROXY_USE_GRPC=0) wins."""
    env = dict(os.environ if base is None else base)
    for name, value in _DEFAULTS.items():
        env.setdefault(name, value)
    return env


def missing_serve_settings(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings `serve_process_env` would add to `base`: what to put in os.environ before ray.init."""
    env = os.environ if base is None else base
    return {name: value for name, value in _DEFAULTS.items() if name not in env}


def set_switch_interval(seconds: float | None) -> None:
    """This process's GIL switch interval (AppConfig.gil_switch_interval_s); None leaves Python's."""
    if seconds is not None:
        sys.setswitchinterval(seconds)
