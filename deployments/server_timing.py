"""The Server-Timing header of streamed answers: where a request's time to first token went.

    server-timing: ingress;dur=41.0, route;dur=12.5, router;dur=3.1, accepted;dur=14.0, replica;dur=27.9, handler;dur=43.2

(milliseconds) ingress: from the ingress's call to the LLM deployment to the
first output back there; route: from that call to the request's arrival on
its LLM replica (Serve's routing and the replica's queue), of which router:
until the request router (deployments/router.py) first took it up; accepted:
from the call until the replica's admission answer, which it sends just before
our handler starts, was back in the ingress (so accepted - route is that
answer's way back: the ingress's side of Serve's path); replica: from
arrival to the first token; handler: from the ingress handler's start to the
response being ready (so handler - ingress is reading the body from the HTTP
proxy, validating and tokenizing it). A client's own time to first token
minus `handler` was spent before the handler ran (the HTTP proxy, the
ingress's queue) and on the way back out.

A stream's way out is told at its end, in an SSE comment line just before
`data: [DONE]` (clients skip comment lines, the SSE rule):

    : end-timing engine=1733600000.101 replica=1733600000.102 ingress=1733600000.104

(wall clock, seconds): when the engine finished the request, when its last
output reached the LLM replica's handler and when the ingress wrote the last
chunk; a client sets its own receipt of [DONE] against them.
"""

from __future__ import annotations

from deployments.messages import GenerateOutput, RequestTiming


def format_server_timing(
    first: GenerateOutput, sent_unix_s: float, now_unix_s: float, accepted_unix_s: float | None = None
) -> str:
    """The header for a stream whose first output is `first`; times are wall clock (one host, or NTP)."""
    parts = [f"ingress;dur={(now_unix_s - sent_unix_s) * 1e3:.1f}"]
    timing = first.timing
    if timing is not None and timing.arrived_unix_s is not None:
        parts.append(f"route;dur={(timing.arrived_unix_s - sent_unix_s) * 1e3:.1f}")
        if timing.router_unix_s is not None:
            parts.append(f"router;dur={(timing.router_unix_s - sent_unix_s) * 1e3:.1f}")
        if accepted_unix_s is not None:
            parts.append(f"accepted;dur={(accepted_unix_s - sent_unix_s) * 1e3:.1f}")
        if timing.time_to_first_token_s is not None:
            parts.append(f"replica;dur={timing.time_to_first_token_s * 1e3:.1f}")
    return ", ".join(parts)


END_TIMING = ": end-timing "


def format_end_timing(timing: RequestTiming | None, ingress_unix_s: float) -> str:
    """The SSE comment line (with its blank line) that ends a stream's last write, before [DONE]."""
    marks = {}
    if timing is not None:
        marks = {"engine": timing.engine_finished_unix_s, "replica": timing.replica_finished_unix_s}
    marks["ingress"] = ingress_unix_s
    return END_TIMING + " ".join(f"{name}={t:.6f}" for name, t in marks.items() if t is not None) + "\n\n"


def parse_end_timing(line: str) -> dict[str, float]:
    """': end-timing engine=1.5 ingress=2.0' -> {'engine': 1.5, 'ingress': 2.0}; {} for any other line."""
    if not line.startswith(END_TIMING.rstrip()):
        return {}
    pairs = (item.partition("=") for item in line[len(END_TIMING):].split())
    return {name: float(value) for name, _, value in pairs if value}


def parse_server_timing(header: str) -> dict[str, float]:
    """'ingress;dur=4.1, route;dur=1.0' -> {'ingress': 4.1, 'route': 1.0} (entries without dur left out)."""
    out = {}
    for entry in filter(None, (e.strip() for e in header.split(","))):
        name, _, params = entry.partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                out[name.strip()] = float(value)
    return out


def add_handler_time(header: str, handler_s: float) -> str:
    """The header with the ingress handler's own time appended."""
    return f"{header}, handler;dur={handler_s * 1e3:.1f}"
