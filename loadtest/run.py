"""Load-test a running server: locust headless with the step shape, then the report. Starts no server.

    python -m loadtest.run --host http://127.0.0.1:8000                 # 1,2,4,...,256 users, 15 s each
    python -m loadtest.run --host ... --steps 1,8,64 --step-time 30 --max-tokens 256
    python -m loadtest.run --host ... --users 32 --run-time 60s          # one fixed load instead of steps
    python -m loadtest.run --host ... -- --prompt-mix shared --think-time 1,3   # more locustfile options

Writes into --out (default runs/loadtest-<timestamp>/): locust's CSVs
(locust_stats.csv, locust_stats_history.csv, locust_failures.csv), the
per-request log (locust_requests*.csv), locust.html, then report.md,
report.json and plot.png, and prints the `Load:` line. Exits with locust's
status (1 when any request failed).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.report import build_report, write_report  # noqa: E402
from loadtest.stages import DEFAULT_STEPS, StepPlan, parse_steps  # noqa: E402

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def get_json(url: str, timeout: float = 5.0, api_key: str = "") -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def served_model(host: str, api_key: str = "") -> str:
    """The first model the server lists; a clear error when nothing answers there."""
    try:
        get_json(f"{host}/health", api_key=api_key)
        return get_json(f"{host}/v1/models", timeout=30, api_key=api_key)["data"][0]["id"]
    except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as exc:
        raise SystemExit(
            f"no OpenAI-compatible server answers at {host} ({exc}).\n"
            "Start one first, e.g. `make serve` (or `serve run serve_config.yaml`) in another terminal, "
            "or pass --host."
        ) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Locust against a running server, then the report.",
        epilog="Arguments after `--` go to locust (any option of loadtest/locustfile.py or of locust).",
    )
    p.add_argument("--host", default=os.environ.get("LOADTEST_HOST", "http://127.0.0.1:8000"))
    p.add_argument("--out", help="Output folder (default runs/loadtest-<timestamp>).")
    p.add_argument("--steps", default=DEFAULT_STEPS, help="User counts of the stages.")
    p.add_argument("--step-time", type=float, default=15.0, help="Seconds per stage.")
    p.add_argument("--users", type=int, help="Instead of steps: this many users ...")
    p.add_argument("--spawn-rate", type=float, default=None, help="... started at this rate per second (default: all in 1 s) ...")
    p.add_argument("--run-time", default="60s", help="... for this long (locust's -t).")
    p.add_argument("--max-tokens", default="128", help="Tokens per answer: N or LOW,HIGH.")
    p.add_argument("--model", default="", help="Model name to send (default: the server's first).")
    p.add_argument("--processes", type=int, default=1, help="Locust processes generating load (-1: one per core).")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    p.add_argument("--device", default="unknown device", help="What serves it, for the report's Load: line.")
    p.add_argument("--title", default="", help="Report title (default: the model name).")
    p.add_argument("--report-command", default="", help="The command named in the Load: line (default: this one).")
    p.add_argument("--warmup-s", type=float, default=0.0, help="Seconds skipped at the start of each stage in the report.")
    p.add_argument("locust_args", nargs=argparse.REMAINDER, help="After --: more locust options.")
    return p


def locust_command(a: argparse.Namespace, out: Path, model: str) -> tuple[list[str], dict[str, str], float]:
    """The locust command line, its environment, and how long it should take (seconds)."""
    prefix = out / "locust"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", a.host, "--csv", str(prefix), "--html", str(out / "locust.html"),
        "--request-log", f"{prefix}_requests.csv", "--max-tokens", str(a.max_tokens), "--model", model,
    ]
    env = dict(os.environ)
    if a.users is not None:
        env.pop("LOAD_SHAPE", None)
        rate = a.spawn_rate if a.spawn_rate is not None else float(a.users)
        cmd += ["-u", str(a.users), "-r", str(rate), "-t", a.run_time]
        expected = _seconds(a.run_time)
    else:
        env["LOAD_SHAPE"] = "steps"
        plan = StepPlan(parse_steps(a.steps), a.step_time)
        cmd += ["--steps", a.steps, "--step-time", str(a.step_time)]
        expected = plan.duration
    if a.processes != 1:
        cmd += ["--processes", str(a.processes)]
    if a.api_key:
        env["OPENAI_API_KEY"] = a.api_key
    extra = list(a.locust_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    return cmd + extra, env, expected


def _seconds(spec: str) -> float:
    """Locust's -t syntax: 90, 90s, 2m, 1h30m."""
    total, number = 0.0, ""
    for ch in str(spec).strip():
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in "hms" and number:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[ch]
            number = ""
        else:
            raise ValueError(f"bad run time {spec!r}")
    return total + (float(number) if number else 0.0)


def run_locust(cmd: list[str], env: dict[str, str], limit_s: float) -> int:
    """Runs locust in the foreground; past `limit_s`, interrupts it (then kills it)."""
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        print(f"locust ran past {limit_s:.0f} s: interrupting it", file=sys.stderr)
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        raise


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    a.host = a.host.rstrip("/")
    model = a.model or served_model(a.host, a.api_key)
    out = Path(a.out or f"runs/loadtest-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    cmd, env, expected = locust_command(a, out, model)
    shown = ("LOAD_SHAPE=steps " if env.get("LOAD_SHAPE") else "") + shlex.join(cmd)
    (out / "command.txt").write_text(shown + "\n", encoding="utf-8")
    print(f"load test of {model} at {a.host}: about {expected:.0f} s; output in {out}", flush=True)
    print(shown, flush=True)
    rc = run_locust(cmd, env, limit_s=expected + 120)
    command = a.report_command or shlex.join(["python", "-m", "loadtest.run", *(sys.argv[1:] if argv is None else argv)])
    try:
        report = build_report(out / "locust", device=a.device, command=command, title=a.title or model, warmup_s=a.warmup_s)
    except FileNotFoundError as exc:
        print(f"no report: {exc}", file=sys.stderr)
        return rc or 1
    written = write_report(report, out)
    print((out / "report.md").read_text(encoding="utf-8").split("\n## ")[0].rstrip())
    print()
    for kind, path in written.items():
        print(f"{kind}: {path}")
    print(report.load_line(), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
