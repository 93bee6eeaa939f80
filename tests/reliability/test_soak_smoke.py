"""`python -m cluster.soak` end to end, briefly: Locust at fixed concurrency against the basic app, the Soak: line.

The real soak (10 minutes on a GPU) is run by hand for BENCHMARKS.md; this
only checks that the command runs, counts and reports (12 s, 2 users).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


def test_soak_command_reports_zero_lost(basic_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOAD_SHAPE"}
    cmd = [
        sys.executable, "-m", "cluster.soak", "--host", basic_url, "--minutes", "0.2", "--users", "2",
        "--max-tokens", "8", "--no-warmup", "--device", "CPU test", "--out", str(tmp_path),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("Soak: ")]
    assert line.startswith("Soak: 0.2 min at 2 users, ") and ", 0 lost, 0 errors (CPU test, python -m cluster.soak " in line
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["requests"] > 0 and result["ok"] == result["requests"]
    assert result["server_requests"] == result["requests"]  # the ingress counted exactly what the clients logged
