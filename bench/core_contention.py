"""Does a busy host slow the engine core's step loop, and does a CPU of its own undo it?

Under Serve the engine steps slower than driven directly with the same batch (W2: inter-token
latency 0.69 against 0.52 ms at one stream, 1.68 against 1.07 at 64, and 26% more core CPU per
request at one stream), while Serve's processes keep several of the host's cores busy. This
script takes Serve out and puts a synthetic load in its place, on the engine driven directly:

1. which CPUs share a physical core (a spin loop pinned to the last CPU, alone and beside a
   spinner on each other CPU: a hidden hyperthread sibling shows as a slowdown);
2. the direct engine (core in a child process, as in a replica) at each level: quiet, beside the
   load, beside the load with the core pinned to the last CPU and the load and this process kept
   off it; quiet and pinned.

The load is what Serve's processes are like: socket ping-pong pairs (many short wake-ups a second
on every core) and a few busy spinners.

    python bench/core_contention.py --concurrency 1,64 --pairs 6 --spinners 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import subprocess
import time
from pathlib import Path

from bench.serve_throughput import DirectEngine, make_prompts
from engine.cpu_affinity import pin_process


def _spin(seconds: float) -> int:
    """Pure-Python work for about `seconds`; returns loop iterations. The clock is read once per
    10k iterations, so a slow clock source on a VM cannot pass for a slow CPU."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        x = 0
        for i in range(10_000):
            x += i
        n += 10_000
    return n


def _spinner(cpu: int | None, stop) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    while not stop.is_set():
        _spin(0.05)


def _ping_pong(conn: socket.socket, first: bool, cpus: set[int] | None, stop) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    if first:
        conn.send(b"x" * 64)
    while not stop.is_set():
        try:
            data = conn.recv(64)
        except OSError:  # the partner stopped first
            return
        if not data:
            return
        _spin(20e-6)  # a little work per message, as a handler does
        try:
            conn.send(data)
        except OSError:
            return


def sibling_probe(target: int, seconds: float = 0.3) -> dict[int, float]:
    """Spin rate on `target` beside a spinner on each other CPU, relative to alone. Each spinner
    starts while this process may run anywhere (a child inherits its parent's CPUs until it pins
    itself), and the timing starts once it spins."""
    every = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {target})
    alone = _spin(seconds)
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for cpu in sorted(every - {target}):
        os.sched_setaffinity(0, every)
        stop = ctx.Event()
        p = ctx.Process(target=_spinner, args=(cpu, stop))
        p.start()
        time.sleep(0.5)
        os.sched_setaffinity(0, {target})
        out[cpu] = _spin(seconds) / alone
        stop.set()
        p.join()
    os.sched_setaffinity(0, every)
    return out


class Load:
    """`pairs` ping-pong process pairs and `spinners` spinners, kept on `cpus` (None: anywhere)."""

    def __init__(self, pairs: int, spinners: int, cpus: set[int] | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._procs = []
        for _ in range(pairs):
            a, b = socket.socketpair()
            self._procs += [ctx.Process(target=_ping_pong, args=(a, True, cpus, self._stop)),
                            ctx.Process(target=_ping_pong, args=(b, False, cpus, self._stop))]
        for i in range(spinners):
            cpu = None if cpus is None else sorted(cpus)[i % len(cpus)]
            self._procs.append(ctx.Process(target=_spinner, args=(cpu, self._stop)))
        for p in self._procs:
            p.start()
        time.sleep(0.5)

    def close(self) -> None:
        self._stop.set()
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo-target")
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--requests", type=int, default=0, help="per level (0: max(32, 4 x c))")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--spinners", type=int, default=2)
    args = p.parse_args()
    print(subprocess.run("lscpu | grep -iE 'model name|^CPU\\(s\\)|thread|core|socket|numa|L3'", shell=True,
                         capture_output=True, text=True).stdout, flush=True)
    every = sorted(os.sched_getaffinity(0))
    last = every[-1]
    sib = Path(f"/sys/devices/system/cpu/cpu{last}/topology/thread_siblings_list")
    print(f"cpu{last} thread_siblings_list: {sib.read_text().strip() if sib.exists() else '?'}")
    probe = sibling_probe(last)
    print("spin rate on cpu", last, "beside a spinner on cpu k (1.0: no effect):",
          " ".join(f"{k}:{v:.2f}" for k, v in probe.items()), flush=True)
    os.sched_setaffinity(0, {last})
    spin_alone = _spin(0.3)
    os.sched_setaffinity(0, set(every))
    ctx = multiprocessing.get_context("spawn")
    for count in (1, 2, 4, 8, 14):
        stop = ctx.Event()
        procs = [ctx.Process(target=_spinner, args=(None, stop)) for _ in range(count)]
        for q in procs:
            q.start()
        time.sleep(0.5)
        os.sched_setaffinity(0, {last})
        rate = _spin(0.3) / spin_alone
        os.sched_setaffinity(0, set(every))
        stop.set()
        for q in procs:
            q.join()
        print(f"spin rate on cpu {last} beside {count} unpinned spinners: {rate:.2f}", flush=True)

    levels = [int(c) for c in args.concurrency.split(",")]
    output_len = 128
    app_args = {
        "model": args.model, "served_model_name": "bench", "max_model_len": 256 + output_len + 64,
        "cache": {"num_blocks": 16384}, "scheduler": {"max_num_seqs": max(levels), "max_num_batched_tokens": 8192},
        "llm_server": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1}},
    }
    engine = DirectEngine(app_args, output_len, "process")
    core_pid = engine._engine._process.pid
    vocab = engine._engine.vocab_size
    others = set(every) - {last}
    n_for = (lambda c: args.requests or max(32, 4 * c))
    batch = iter(range(1, 1000))

    def prompts_for(c: int, warm_up: bool = False) -> list[list[int]]:
        return make_prompts(c if warm_up else n_for(c), 256, vocab, seed=next(batch) * 7919 + c)

    conditions = [
        ("quiet", None, False),
        ("load", "anywhere", False),
        ("load, core pinned", "others", True),
        ("quiet, core pinned", None, True),
        ("load", "anywhere", False),
    ]
    print(f"\n{'condition':<22}" + "".join(f"{'c=' + str(c) + ' tok/s':>14}{'ITL p50':>9}" for c in levels), flush=True)
    try:
        for name, load_where, pinned in conditions:
            pin_process({last} if pinned else set(every), core_pid)
            os.sched_setaffinity(0, others if pinned else set(every))
            load = None if load_where is None else Load(args.pairs, args.spinners, others if load_where == "others" else None)
            try:
                rows = engine.run_levels(name, levels, prompts_for)
            finally:
                if load is not None:
                    load.close()
            print(f"{name:<22}" + "".join(f"{r['tok_s']:>14.0f}{r['itl_p50_ms']:>9.2f}" for r in rows), flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
