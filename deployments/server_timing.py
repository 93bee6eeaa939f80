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
"""

from __future__ import annotations

from deployments.messages import GenerateOutput


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
