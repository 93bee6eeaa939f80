"""Serve's settings that only the environment of Ray's processes can carry."""

from deployments.ray_env import missing_serve_settings, serve_process_env


def test_the_proxy_uses_grpc_unless_the_user_chose() -> None:
    assert serve_process_env({"PATH": "/bin"}) == {"PATH": "/bin", "RAY_SERVE_PROXY_USE_GRPC": "1"}
    assert serve_process_env({"RAY_SERVE_PROXY_USE_GRPC": "0"}) == {"RAY_SERVE_PROXY_USE_GRPC": "0"}


def test_only_what_is_missing_is_added() -> None:
    assert missing_serve_settings({}) == {"RAY_SERVE_PROXY_USE_GRPC": "1"}
    assert missing_serve_settings({"RAY_SERVE_PROXY_USE_GRPC": "0"}) == {}
