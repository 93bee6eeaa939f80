"""Serve's settings that only the environment of Ray's processes can carry."""

import os
import subprocess
import sys

from deployments.ray_env import missing_serve_settings, serve_process_env, set_switch_interval

OURS = {"RAY_SERVE_PROXY_USE_GRPC": "1", "RAY_worker_niceness": "0", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def test_the_proxy_uses_grpc_and_workers_run_at_nice_0_unless_the_user_chose() -> None:
    assert serve_process_env({"PATH": "/bin"}) == {"PATH": "/bin", **OURS}
    theirs = {"RAY_SERVE_PROXY_USE_GRPC": "0", "RAY_worker_niceness": "15", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}
    assert serve_process_env(theirs) == theirs


def test_only_what_is_missing_is_added() -> None:
    assert missing_serve_settings({}) == OURS
    assert missing_serve_settings({"RAY_SERVE_PROXY_USE_GRPC": "0"}) == {
        "RAY_worker_niceness": "0",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    }
    assert missing_serve_settings(OURS) == {}


def test_ray_workers_take_their_niceness_from_the_environment() -> None:
    """A real Ray started with serve_process_env: a task's process runs at the niceness asked for
    (Ray's own default, 15, would put it behind every nice-0 process on a busy host)."""
    script = (
        "import os, ray\n"
        "ray.init(num_cpus=1, include_dashboard=False)\n"
        "print('worker nice', ray.get(ray.remote(lambda: os.nice(0)).remote()))\n"
        "ray.shutdown()\n"
    )
    env = serve_process_env({k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"})
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert f"worker nice {os.nice(0)}" in out.stdout, out.stderr[-2000:]


def test_a_replica_sets_its_switch_interval_only_when_configured() -> None:
    before = sys.getswitchinterval()
    try:
        set_switch_interval(None)
        assert sys.getswitchinterval() == before
        set_switch_interval(0.0005)
        assert abs(sys.getswitchinterval() - 0.0005) < 1e-9
    finally:
        sys.setswitchinterval(before)
