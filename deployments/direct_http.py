"""An ingress replica's own HTTP listener, beside Serve's HTTP proxy.

Serve runs one HTTP proxy process per node, and every request and stream chunk
crosses it: on an H100 host it is busy all the time near 160 streamed requests
per second (~6 ms of its CPU each; BENCHMARKS.md, W2), while the engine can
finish more. With `ingress_direct_http` set, each ingress replica also serves the
same OpenAI API on one port of its node itself. The socket is opened with
SO_REUSEPORT, so the replicas of a node share the port and the kernel spreads
connections over them: more ingress replicas, more HTTP capacity, one address,
and one hop (and one process) less per request. Routing to the LLM replicas,
backpressure and autoscaling are the same Serve handles either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the replica's process belongs to Ray."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other processes of this node may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class DirectHTTPServer:
    """Serves an ASGI app on host:port from the running event loop until stopped."""

    def __init__(self, app, host: str, port: int) -> None:
        # Bound here, not in the task: a port that cannot be had fails the replica's start.
        self._sock = reuseport_socket(host, port)
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, timeout_keep_alive=30)
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]))

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    async def stop(self) -> None:
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._sock.close()
