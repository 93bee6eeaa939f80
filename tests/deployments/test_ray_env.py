"""Serve's settings that only the environment of Ray's processes can carry."""

import os
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


def test_ray_workers_take_their_niceness_from_the_environment(serve_cluster) -> None:
    """This folder's real Ray, started with missing_serve_settings in its environment (conftest.py, as
    `make serve` and every launcher here): a task's process runs at this process's niceness (Ray's own
    default, 15, would put it behind every nice-0 process on a busy host)."""
    import ray

    # What the cluster was started with (a RAY_worker_niceness of the user's own would win: by design).
    assert os.environ.get("RAY_worker_niceness") == "0", "RAY_worker_niceness set outside the tests"
    assert ray.get(ray.remote(num_cpus=0)(_niceness).remote()) == os.nice(0)


def _niceness() -> int:
    return os.nice(0)


def test_a_replica_sets_its_switch_interval_only_when_configured() -> None:
    before = sys.getswitchinterval()
    try:
        set_switch_interval(None)
        assert sys.getswitchinterval() == before
        set_switch_interval(0.0005)
        assert abs(sys.getswitchinterval() - 0.0005) < 1e-9
    finally:
        sys.setswitchinterval(before)
