"""CPU time used by the local processes of a Serve app, by role (Linux /proc).

Read before and after a stretch of load, the difference divided by the requests
served says what one request costs each process, in CPU milliseconds: a
measure that holds on a busy machine, where wall-clock shares do not, and that
points at the process that runs out of CPU first.
"""

from __future__ import annotations

import os
from pathlib import Path

# Role -> what its command line contains (Ray sets actor process titles to ray::<name>).
SERVE_ROLES: dict[str, str] = {
    "proxy": "ray::ProxyActor",
    "ingress": "OpenAIIngress",
    "llm_replica": "ray::ServeReplica:llm:LLMServer",
    "engine_core": "engine.core_process",
}


def cpu_seconds_by_role(roles: dict[str, str] = SERVE_ROLES, proc: Path = Path("/proc")) -> dict[str, float]:
    """User + system CPU seconds so far, summed over the live processes of each role; {} without /proc."""
    if not proc.is_dir():
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    totals = dict.fromkeys(roles, 0.0)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended meanwhile
            continue
        for role, pattern in roles.items():
            if pattern in cmdline:
                totals[role] += _cpu_ticks(stat) / ticks
                break
    return totals


def per_request_ms(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """CPU milliseconds per request of each role between two readings."""
    if not requests:
        return {}
    return {role: (after[role] - before.get(role, 0.0)) / requests * 1e3 for role in after}


def _cpu_ticks(stat: str) -> int:
    # The second field (the command) may hold spaces and parentheses: fields are counted
    # after its closing one. utime and stime are fields 14 and 15 of proc(5).
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])
