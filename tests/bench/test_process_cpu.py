"""CPU time by process role, read from a /proc tree (a fake one here, with known numbers)."""

from __future__ import annotations

import os
from pathlib import Path

from bench.process_cpu import cpu_seconds_by_role, per_request_ms


def _process(proc: Path, pid: int, cmdline: str, utime: int, stime: int) -> None:
    d = proc / str(pid)
    d.mkdir()
    (d / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")
    # The command field may hold spaces and parentheses; utime/stime are fields 14 and 15.
    rest = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 5
    (d / "stat").write_text(f"{pid} (ray::Weird) (name) " + " ".join(rest) + "\n")


def test_cpu_seconds_are_summed_per_role(tmp_path):
    ticks = os.sysconf("SC_CLK_TCK")
    _process(tmp_path, 10, "ray::ProxyActor", 3 * ticks, ticks)
    _process(tmp_path, 11, "ray::ServeReplica:llm:OpenAIIngress", ticks, 0)
    _process(tmp_path, 12, "ray::ServeReplica:llm:OpenAIIngress", 2 * ticks, ticks)
    _process(tmp_path, 13, "python -m engine.core_process 7", 5 * ticks, 0)
    _process(tmp_path, 14, "python bench/serve_throughput.py", 9 * ticks, 0)  # no role: left out
    (tmp_path / "self").mkdir()  # not a pid
    totals = cpu_seconds_by_role(proc=tmp_path)
    assert totals == {"proxy": 4.0, "ingress": 4.0, "llm_replica": 0.0, "engine_core": 5.0}
    assert per_request_ms({"proxy": 1.0, "ingress": 4.0}, totals, 100) == {
        "proxy": 30.0, "ingress": 0.0, "llm_replica": 0.0, "engine_core": 50.0
    }
    assert per_request_ms(totals, totals, 0) == {}


def test_no_proc_tree_reads_nothing(tmp_path):
    assert cpu_seconds_by_role(proc=tmp_path / "missing") == {}
