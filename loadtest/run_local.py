"""One command, bounded in time: start the app on this machine, load-test it, report, stop everything.

    python -m loadtest.run_local                  # serve_config.yaml as is (demo model), 1..256 users, 15 s each
    python -m loadtest.run_local --gpu            # the same on one GPU, batching all 256 users
    python -m loadtest.run_local --gpu --set quantization=int8 --steps 1,16,256 --step-time 30
    python -m loadtest.run_local --gpu -- --prompt-mix shared      # after --: locustfile options

1. `python -m loadtest.serve_local` in its own process group: a fresh local Ray,
   HTTP on 127.0.0.1 only; its output goes to <out>/server.log.
2. Waits for GET /v1/models (the LLM replica is up), then warms up with a few
   requests (CUDA graphs, first prefill) so the first stage measures the steady state.
3. `loadtest.run`: locust headless with the step shape, then report.md / plot.png.
4. Stops the server (SIGINT, then SIGKILL of its process group).

Nothing outside loopback is touched. Worst case it takes --server-timeout +
the stages + about 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest import run  # noqa: E402
from loadtest.prompts import PromptSource, parse_mix  # noqa: E402
from loadtest.stages import DEFAULT_STEPS, StepPlan, parse_steps  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# One replica on one GPU that batches every user of the default plan (serve_config.yaml's GPU notes).
GPU_SETS = (
    "device=cuda",
    "llm_server.ray_actor_options.num_gpus=1",
    "scheduler.max_num_seqs=256",
    "llm_server.max_ongoing_requests=256",
    "llm_server.max_queued_requests=512",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log_path: Path, config: str | None = None, sets: list[str] | tuple[str, ...] = (), num_cpus: float | None = None) -> subprocess.Popen:
    """`python -m loadtest.serve_local` in a new session (so its Ray processes can be stopped as a group)."""
    cmd = [sys.executable, "-m", "loadtest.serve_local", "--port", str(port)]
    if config:
        cmd += ["--config", config]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    cmd += [f"--set={s}" for s in sets]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        return subprocess.Popen(
            cmd, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


class ServerError(RuntimeError):
    pass


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> str:
    """Polls GET /v1/models until the LLM replica answers; returns the model name (ServerError if it never does)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise ServerError(f"the server exited ({proc.returncode}) before it was up:\n{tail(log_path)}")
        try:
            return run.get_json(f"{url}/v1/models", timeout=5)["data"][0]["id"]
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise ServerError(f"the server was not up after {timeout_s:.0f} s:\n{tail(log_path)}")
        time.sleep(1.0)


def stop_server(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGINT (serve.shutdown, ray.shutdown), then SIGKILL to whatever of its process group is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def warm_up(url: str, model: str, concurrency: int = 8, rounds: int = 2, max_tokens: int = 16) -> None:
    """A few rounds of concurrent requests of every kind, answers discarded."""
    source = PromptSource(parse_mix("mixed"), seed=0)
    errors: list[str] = []

    def one(i: int) -> None:
        chat = i % 2 == 0
        prompt = source.make(("short", "long", "shared")[i % 3], chat=chat)
        body = {"model": model, "max_tokens": max_tokens, "stream": i % 4 < 2}
        if chat:
            body["messages"] = list(prompt.messages or ())
        else:
            body["prompt"] = prompt.text
        path = "/v1/chat/completions" if chat else "/v1/completions"
        request = urllib.request.Request(
            f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as resp:
                resp.read()
        except Exception as exc:
            errors.append(f"{path}: {exc}")

    for _ in range(rounds):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        print(f"warm-up: {len(errors)} of {concurrency * rounds} requests failed, e.g. {errors[0]}", file=sys.stderr)


def describe_device(gpu: bool) -> str:
    if gpu:
        try:
            names = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            ).stdout.split("\n")
            name = names[0].strip()
            if name:
                return f"1x {name}"
        except (OSError, subprocess.SubprocessError):
            pass
        return "1 GPU"
    return f"CPU ({os.cpu_count()} cores)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Start the app locally, load-test it with the step shape, report, stop.")
    p.add_argument("--gpu", action="store_true", help="One GPU replica: " + ", ".join(GPU_SETS) + ".")
    p.add_argument("--config", help="Serve config to take the app's args from (default: serve_config.yaml).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override an app arg (dotted path, yaml value); after --gpu's.")
    p.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (default: a free one).")
    p.add_argument("--num-cpus", type=float, default=None, help="Logical CPUs of the local Ray (default: the cores).")
    p.add_argument("--out", help="Output folder (default runs/loadtest-local-<timestamp>).")
    p.add_argument("--steps", default=DEFAULT_STEPS)
    p.add_argument("--step-time", type=float, default=15.0)
    p.add_argument("--max-tokens", default="128")
    p.add_argument("--processes", type=int, default=None, help="Locust processes (default: 4 with 8+ cores, else 1).")
    p.add_argument("--server-timeout", type=float, default=300.0, help="Seconds to wait for the server to come up.")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--device", default="", help="For the Load: line (default: the GPU's name, or the CPU).")
    p.add_argument("locust_args", nargs=argparse.REMAINDER, help="After --: more locust options.")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    StepPlan(parse_steps(a.steps), a.step_time)  # fail on a bad plan before starting anything
    out = Path(a.out or f"runs/loadtest-local-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    port = a.port or free_port()
    url = f"http://127.0.0.1:{port}"
    sets = [*(GPU_SETS if a.gpu else ()), *a.set]
    processes = a.processes if a.processes is not None else (4 if (os.cpu_count() or 1) >= 8 else 1)
    log_path = out / "server.log"
    print(f"starting the server on {url} (log: {log_path})", flush=True)
    started = time.monotonic()
    proc = start_server(port, log_path, a.config, sets, a.num_cpus)
    try:
        try:
            model = wait_ready(url, proc, log_path, a.server_timeout)
        except ServerError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"server up in {time.monotonic() - started:.0f} s, serving {model}", flush=True)
        if not a.no_warmup:
            t0 = time.monotonic()
            warm_up(url, model)
            print(f"warm-up done in {time.monotonic() - t0:.1f} s", flush=True)
        device = a.device or describe_device(a.gpu)
        command = shlex.join(["python", "-m", "loadtest.run_local", *argv])
        run_args = [
            "--host", url, "--out", str(out), "--steps", a.steps, "--step-time", str(a.step_time),
            "--max-tokens", str(a.max_tokens), "--processes", str(processes), "--model", model,
            "--device", f"{device}, Ray Serve, {model}", "--report-command", command,
        ]
        extra = a.locust_args[1:] if a.locust_args[:1] == ["--"] else a.locust_args
        if extra:
            run_args += ["--", *extra]
        return run.main(run_args)
    finally:
        print("stopping the server", flush=True)
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
