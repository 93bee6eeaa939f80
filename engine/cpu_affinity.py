"""A CPU of its own for each engine core on a GPU node, and every other serving process kept off it.

Why. With a small model a decode step is mostly Python on the engine core's one thread, so the
step takes as long as that thread's CPU time. Under Serve the host also runs the ingress and LLM
replicas, their gRPC threads and Ray's processes; each wake-up of theirs that the kernel places on
the core's CPU preempts the step. On the H200 host, the engine driven directly beside a synthetic
load of that kind (bench/core_contention.py: six socket ping-pong pairs and two spinners) gave
15.4k tok/s at 16 streams unpinned and 22.2k with its core pinned and the load kept off that CPU
(21.0k on the quiet host). Through Serve on one machine, pinned against unpinned: 90/102/107%
against 85/86/85% of the direct engine at 16/64/256 streams (BENCHMARKS.md, W2).

The plan: the highest-numbered CPUs of the node, one per GPU (GPU i gets the i-th from the top),
are the engine cores'; the replicas and the ingress run on the rest. With SMT, a core's hardware
sibling (the other thread of its physical core, from sysfs) is left idle too: a busy sibling shares
the core's execution units and caches, so the step slows though no one preempts it. Each engine
core then takes a physical core of its own, from the top; siblings stay in use only where keeping
them idle would leave the others fewer than MIN_CPUS_PER_GPU - 1 CPUs per GPU. Nodes with fewer
than MIN_CPUS_PER_GPU CPUs per GPU get no plan: there the others need every CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MIN_CPUS_PER_GPU = 4
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU of the node, whatever CUDA_VISIBLE_DEVICES says
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")


def node_gpu_count(gpus_dir: Path = NVIDIA_GPUS) -> int:
    """The NVIDIA GPUs of this node (0 without the driver), without initializing CUDA."""
    try:
        return sum(1 for _ in gpus_dir.iterdir())
    except OSError:
        return 0


def node_cpus() -> set[int]:
    """The CPUs of this node or container: PID 1's affinity (ours if it cannot be read)."""
    try:
        return os.sched_getaffinity(1)
    except OSError:
        return os.sched_getaffinity(0)


def parse_cpu_list(text: str) -> frozenset[int]:
    """A kernel CPU list ("0,8", "0-1", "3") as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


def smt_siblings(cpu: int, topology: Path = CPU_TOPOLOGY) -> frozenset[int]:
    """The other hardware threads of `cpu`'s physical core (empty without SMT, or unreadable)."""
    try:
        text = (topology / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text()
    except OSError:
        return frozenset()
    return parse_cpu_list(text) - {cpu}


def visible_gpu_index(env: dict[str, str] | None = None) -> int:
    """The node-wide index of this process's first GPU (Ray sets CUDA_VISIBLE_DEVICES per replica).
    0 when unset or not a plain index (a GPU UUID)."""
    first = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


@dataclass(frozen=True)
class CpuPlan:
    """engine_cpus[i]: the CPU of GPU i's engine core; others: where everything else runs."""

    engine_cpus: tuple[int, ...]
    others: frozenset[int]
    idle: frozenset[int] = frozenset()  # the engine cores' SMT siblings, kept free

    @classmethod
    def for_node(
        cls,
        cpus: set[int] | frozenset[int] | None = None,
        num_gpus: int | None = None,
        siblings: Callable[[int], frozenset[int]] = smt_siblings,
    ) -> CpuPlan | None:
        """The plan for this node (None: no GPUs, or too few CPUs for a CPU per engine core).
        `cpus` defaults to the node's (container's) CPUs, read from PID 1, so that every process
        gets the same plan whether or not it or its parent has been pinned already. `siblings`
        gives a CPU's SMT siblings (sysfs by default)."""
        cpus = frozenset(node_cpus() if cpus is None else cpus)
        num_gpus = node_gpu_count() if num_gpus is None else num_gpus
        if num_gpus <= 0 or len(cpus) < MIN_CPUS_PER_GPU * num_gpus:
            return None
        engine: list[int] = []
        idle: set[int] = set()
        for cpu in sorted(cpus, reverse=True):  # one physical core each, from the top
            if len(engine) < num_gpus and cpu not in idle:
                engine.append(cpu)
                idle |= siblings(cpu) & cpus
        if len(engine) == num_gpus and len(cpus) - len(engine) - len(idle) >= (MIN_CPUS_PER_GPU - 1) * num_gpus:
            return cls(tuple(engine), cpus - frozenset(engine) - idle, frozenset(idle))
        top = tuple(sorted(cpus, reverse=True)[:num_gpus])  # too few physical cores to keep siblings idle
        return cls(top, cpus - frozenset(top))

    def core_cpu(self, gpu_index: int) -> int | None:
        """GPU gpu_index's engine core CPU; None for an index past the node's GPUs."""
        return self.engine_cpus[gpu_index] if 0 <= gpu_index < len(self.engine_cpus) else None


def pin_process(cpus: set[int] | frozenset[int], pid: int = 0) -> None:
    """Every thread of process `pid` (0: this one) onto `cpus`; threads started later inherit it.
    (sched_setaffinity moves one thread: Ray's and gRPC's threads are already running.)"""
    tasks = Path(f"/proc/{pid or os.getpid()}/task")
    for task in tasks.iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
