"""Locust, headless, against the real app served on loopback by this test (shipped serve_config.yaml, CPU).

The server is `python -m loadtest.serve_local` in its own process group (its
own local Ray, whatever else runs in this session); locust runs as a
subprocess (it monkey-patches the process it is imported in). Both runs are
bounded: 4 users for 8 s, then steps of 1 and 3 users for 4 s each.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import report, run
from loadtest.records import read_records
from loadtest.run_local import free_port, start_server, stop_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("loadtest_server")
    port = free_port()
    log = folder / "server.log"
    proc = start_server(port, log, num_cpus=4)  # logical CPUs: replicas mostly wait
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, log, timeout_s=150)
        yield url
    finally:
        stop_server(proc, grace_s=30)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_locust_headless(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "locust"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", server, "-u", "4", "-r", "4", "-t", "8s",
        "--csv", str(prefix), "--html", str(tmp_path / "locust.html"),
        "--max-tokens", "8", "--seed", "1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "LOAD_SHAPE"}
    done = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    # The locustfile's totals at exit (locust's own _stats.csv lags up to a second).
    stats = {(r["Type"], r["Name"]): r for r in _rows(Path(f"{prefix}_final_stats.csv"))}
    total = stats[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0
    posts = {name: int(r["Request Count"]) for (kind, name), r in stats.items() if kind == "POST"}
    assert posts.get("/v1/completions", 0) + posts.get("/v1/completions stream", 0) > 0, posts
    assert posts.get("/v1/chat/completions", 0) + posts.get("/v1/chat/completions stream", 0) > 0, posts
    ttft = [int(r["Request Count"]) for (kind, _), r in stats.items() if kind == "TTFT"]
    itl = [int(r["Request Count"]) for (kind, _), r in stats.items() if kind == "ITL"]
    assert sum(ttft) > 0 and sum(itl) > 0, stats.keys()
    assert (tmp_path / "locust.html").stat().st_size > 10_000

    records = read_records([Path(f"{prefix}_requests.csv")])
    assert len(records) == sum(posts.values())
    assert all(r.ok and r.completion_tokens == 8 and r.prompt_tokens > 0 for r in records)  # ignore_eos: max_tokens each
    streamed = [r for r in records if r.stream]
    assert len(streamed) == sum(ttft)
    assert all(r.start < r.first_token <= r.end and 0 < r.ttft_ms <= r.latency_ms and r.itl_ms > 0 for r in streamed)
    assert {r.prompt_kind for r in records} <= {"short", "long", "shared"}

    assert report.main([str(prefix), "--out", str(tmp_path / "report"), "--device", "CPU", "--command", "pytest"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"Load: 4 users, [\d.]+ req/s, \d+ tok/s, TTFT p50/p99 [\d.]+/[\d.]+ ms, failures 0 \(CPU, pytest\)", line
    ), line
    md = (tmp_path / "report" / "report.md").read_text()
    assert re.search(r"^\| 4 \| \d+ \| \d+ \|", md, re.M), md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "report" / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_step_shape_with_two_locust_processes(server: str, tmp_path: Path) -> None:
    """`loadtest.run` end to end: the step shape, workers' own request logs, the report; shared prompts hit the cache."""
    out = tmp_path / "run"
    rc = run.main([
        "--host", server, "--out", str(out), "--steps", "1,3", "--step-time", "4", "--max-tokens", "8",
        "--processes", "2", "--device", "CPU", "--", "--prompt-mix", "shared", "--stream-fraction", "1",
    ])
    assert rc == 0
    assert len(list(out.glob("locust_requests.*.csv"))) == 2  # one per worker
    data = json.loads((out / "report.json").read_text())
    assert data["total_failures"] == 0
    assert [s["users"] for s in data["stages"]] == [1, 3]
    for stage in data["stages"]:
        assert stage["requests"] > 0 and stage["tok_s"] > 0 and stage["ttft_p50"] > 0
    assert data["stages"][-1]["cached_pct"] > 50  # the shared preamble comes from the prefix cache
    assert data["load_line"].startswith("Load: 3 users, ")
    assert (out / "report.md").is_file() and (out / "command.txt").is_file()
    assert (out / "locust_final_stats.csv").is_file()  # written by the master
