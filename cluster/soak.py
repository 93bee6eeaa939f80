"""Soak test: the app under a fixed number of Locust users for N minutes; every request must be answered.

    python -m cluster.soak --gpu --minutes 10 --users 128            # starts the app on this machine's GPU
    python -m cluster.soak --host http://127.0.0.1:8000 --minutes 10 --users 128 --device "2x node, 8x H100"
    python -m cluster.soak --minutes 1 --users 4 --max-tokens 16     # CPU, demo model: a quick rehearsal

1. Without --host: starts serve_config.yaml's app on loopback (`loadtest.serve_local`,
   `--gpu`: one GPU replica batching 256 sequences, as `loadtest.run_local --gpu`),
   waits for it and warms it up.
2. Reads the server's request counters (GET /metrics), runs `loadtest.run` with
   `--users U --run-time Nm` (locust's `--stop-timeout` lets every user finish
   its request at the end, so the harness cuts none), reads the counters again.
3. Counts, from the per-request log: requests; lost = no complete answer
   (connection refused or reset, a stream cut before `data: [DONE]`, or a
   request the server counted that the client never logged); errors = an
   answer that is an error (HTTP 4xx/5xx, an error event in a stream).
4. Prints the report line for BENCHMARKS.md and writes soak.json:

   Soak: <minutes> min at <users> users, <requests> requests, <lost> lost, <errors> errors (device, command)

Exit status 0 only with zero lost and zero errors. Bounded: the server gets
--server-timeout to start, locust the run time plus 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from loadtest import run, run_local  # noqa: E402
from loadtest.records import RequestRecord, read_records  # noqa: E402
from loadtest.report import request_logs  # noqa: E402

STOP_TIMEOUT_S = 60  # at the end, users finish the request they are in (loadtest.run allows 120 s past the run time)

# The locustfile's failure messages for requests that got no complete answer.
_LOST_PREFIXES = ("connection error", "stream broken", "stream ended without [DONE]")


@dataclass
class SoakResult:
    minutes: float
    users: int
    requests: int
    lost: int
    errors: int
    device: str
    command: str
    ok: int = 0
    unlogged: int = 0  # counted by the server, never logged by a client
    server_requests: int | None = None
    server_statuses: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"Soak: {self.minutes:g} min at {self.users} users, {self.requests} requests, {self.lost} lost, "
            f"{self.errors} errors ({self.device}, {self.command})"
        )


def is_lost(record: RequestRecord) -> bool:
    return not record.ok and record.error.startswith(_LOST_PREFIXES)


def server_counts(url: str, api_key: str = "") -> dict[str, int]:
    """status -> requests the ingress answered on the generation endpoints (llm_requests_total), {} if unreadable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        with urllib.request.urlopen(request, timeout=30) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "llm_requests_total":
                counts[s.labels["status"]] = counts.get(s.labels["status"], 0) + int(s.value)
    return counts


def tally(
    records: list[RequestRecord], before: dict[str, int], after: dict[str, int], *, minutes: float, users: int,
    device: str, command: str,
) -> SoakResult:
    lost = [r for r in records if is_lost(r)]
    errors = [r for r in records if not r.ok and not is_lost(r)]
    result = SoakResult(
        minutes=minutes, users=users, requests=len(records), lost=len(lost), errors=len(errors),
        device=device, command=command, ok=sum(r.ok for r in records),
        error_examples=sorted({r.error for r in lost + errors})[:10],
    )
    if before or after:
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        result.server_statuses = {k: v for k, v in sorted(delta.items()) if v}
        result.server_requests = sum(delta.values())
        # With one ingress replica its counters see every request; with several, only some (never too many).
        result.unlogged = max(0, result.server_requests - len(records))
        result.lost += result.unlogged
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fixed-concurrency soak with Locust; prints the Soak: line.")
    p.add_argument("--host", help="A running server (default: start serve_config.yaml's app here).")
    p.add_argument("--gpu", action="store_true", help="Started here: one GPU replica (loadtest.run_local --gpu).")
    p.add_argument("--config", help="Serve config to take the app's args from (default: serve_config.yaml).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override an app arg (dotted path).")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--users", type=int, default=128)
    p.add_argument("--max-tokens", default="128", help="Tokens per answer: N or LOW,HIGH.")
    p.add_argument("--processes", type=int, default=None, help="Locust processes (default: 4 with 8+ cores, else 1).")
    p.add_argument("--api-key", default="", help="Sent as a bearer token (also for /metrics).")
    p.add_argument("--device", default="", help="For the Soak: line (default: the GPU's name, or the CPU).")
    p.add_argument("--out", help="Output folder (default runs/soak-<timestamp>).")
    p.add_argument("--server-timeout", type=float, default=600.0)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("locust_args", nargs=argparse.REMAINDER, help="After --: more locustfile options.")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    out = Path(a.out or f"runs/soak-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "cluster.soak", *argv])
    device = a.device or (run_local.describe_device(a.gpu) if not a.host else "remote server")
    processes = a.processes if a.processes is not None else (4 if (os.cpu_count() or 1) >= 8 else 1)
    proc = None
    url = (a.host or "").rstrip("/")
    try:
        if not a.host:
            port = run_local.free_port()
            url = f"http://127.0.0.1:{port}"
            sets = [*(run_local.GPU_SETS if a.gpu else ()), *a.set]
            print(f"starting the server on {url} (log: {out / 'server.log'})", flush=True)
            proc = run_local.start_server(port, out / "server.log", a.config, sets)
            run_local.wait_ready(url, proc, out / "server.log", a.server_timeout)
        model = run.served_model(url, a.api_key)
        if not a.no_warmup and not a.api_key:
            run_local.warm_up(url, model)
        before = server_counts(url, a.api_key)
        run_time = f"{round(a.minutes * 60)}s"
        extra = a.locust_args[1:] if a.locust_args[:1] == ["--"] else a.locust_args
        run_args = [
            "--host", url, "--out", str(out), "--users", str(a.users), "--run-time", run_time,
            "--max-tokens", a.max_tokens, "--processes", str(processes), "--model", model,
            "--device", device, "--report-command", command, "--title", f"soak: {model}",
            *(["--api-key", a.api_key] if a.api_key else []),
            "--", "--stop-timeout", str(STOP_TIMEOUT_S), *extra,
        ]
        locust_rc = run.main(run_args)
        after = server_counts(url, a.api_key)
    except run_local.ServerError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            print("stopping the server", flush=True)
            run_local.stop_server(proc)
    records = read_records(request_logs(out / "locust"))
    result = tally(records, before, after, minutes=a.minutes, users=a.users, device=device, command=command)
    (out / "soak.json").write_text(json.dumps({**asdict(result), "locust_rc": locust_rc, "line": result.line()}, indent=2))
    print(f"server counted {result.server_requests} generation requests {result.server_statuses}; "
          f"clients logged {result.requests} ({result.ok} ok)")
    for example in result.error_examples:
        print(f"  failure: {example}")
    print(result.line(), flush=True)
    return 0 if result.lost == 0 and result.errors == 0 and result.requests > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
