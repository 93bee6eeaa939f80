"""The multi-node rehearsal: `python -m cluster.local_cluster` (head + two workers on this machine).

It runs as a subprocess (its own Ray cluster, whatever else this pytest
process runs) and is bounded twice: the script's own --timeout, then this
test's, which sends SIGTERM (the script then stops its cluster) before SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(330)]

REPO = Path(__file__).resolve().parents[2]


def test_rehearsal_spreads_replicas_and_scales_without_failures() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.local_cluster", "--timeout", "200"],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        out, _ = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail("the rehearsal ran past 280 s:\n" + out[-6000:])
    assert proc.returncode == 0, out[-6000:]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("REHEARSAL ")]
    report = json.loads(line.removeprefix("REHEARSAL "))
    assert report["ok"] and report["failures"] == 0 and report["requests"] >= 10
    assert sorted(report["nodes"].values()) == ["node_a", "node_b", "node_head"]
    steps = {s["step"]: s for s in report["steps"]}
    two = steps["scaled to 2"]["replicas"]
    assert sorted(two.values()) == ["node_a", "node_b"]  # one LLM replica per GPU worker
    assert set(steps["both replicas answered"]["seen"]) == set(two)
    assert steps["scaled to 1"]["replica"] in two  # scaling down stopped one, restarted none
    assert "cluster stopped" in out
