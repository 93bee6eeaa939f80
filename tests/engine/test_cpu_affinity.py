"""engine/cpu_affinity.py: the node's CPU plan, and a real engine core started on its CPU."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import CacheConfig, ConfigError, EngineConfig, SamplingParams
from engine.core_process import EngineCoreClient
from engine.cpu_affinity import CpuPlan, node_gpu_count, parse_cpu_list, pin_process, smt_siblings, visible_gpu_index


def _no_smt(cpu: int) -> frozenset[int]:
    return frozenset()


def _pairs_of(half: int):
    """SMT as Linux numbers it on most x86 hosts: CPU n and n + half share a physical core."""
    return lambda cpu: frozenset({cpu + half if cpu < half else cpu - half})


def test_plan_gives_each_gpu_one_of_the_highest_cpus():
    plan = CpuPlan.for_node(cpus=set(range(16)), num_gpus=2, siblings=_no_smt)
    assert plan.engine_cpus == (15, 14)
    assert plan.others == frozenset(range(14))
    assert plan.idle == frozenset()
    assert [plan.core_cpu(i) for i in (0, 1, 2, -1)] == [15, 14, None, None]


def test_plan_follows_the_allowed_cpus_not_their_count():
    plan = CpuPlan.for_node(cpus={2, 3, 5, 8}, num_gpus=1, siblings=_no_smt)
    assert plan.engine_cpus == (8,)
    assert plan.others == frozenset({2, 3, 5})


def test_plan_keeps_each_engine_cores_smt_sibling_idle():
    plan = CpuPlan.for_node(cpus=set(range(16)), num_gpus=2, siblings=_pairs_of(8))
    assert plan.engine_cpus == (15, 14)
    assert plan.idle == frozenset({7, 6})
    assert plan.others == frozenset(range(16)) - {15, 14, 7, 6}


def test_plan_takes_one_physical_core_per_engine_when_siblings_are_adjacent():
    # Siblings numbered (0,1), (2,3), ...: 15's sibling 14 is no engine CPU of another GPU.
    plan = CpuPlan.for_node(cpus=set(range(16)), num_gpus=2, siblings=lambda c: frozenset({c ^ 1}))
    assert plan.engine_cpus == (15, 13)
    assert plan.idle == frozenset({14, 12})
    assert plan.others == frozenset(range(12))


def test_plan_uses_siblings_when_keeping_them_idle_leaves_too_few_cpus():
    plan = CpuPlan.for_node(cpus=set(range(8)), num_gpus=2, siblings=_pairs_of(4))
    assert plan.engine_cpus == (7, 6)
    assert plan.idle == frozenset()
    assert plan.others == frozenset(range(6))


@pytest.mark.parametrize(("text", "cpus"), [("0,8\n", {0, 8}), ("2-3\n", {2, 3}), ("5", {5}), ("0-1,4", {0, 1, 4})])
def test_parse_cpu_list(text, cpus):
    assert parse_cpu_list(text) == frozenset(cpus)


def test_smt_siblings_read_from_the_topology_files(tmp_path):
    (tmp_path / "cpu3" / "topology").mkdir(parents=True)
    (tmp_path / "cpu3" / "topology" / "thread_siblings_list").write_text("3,11\n")
    assert smt_siblings(3, tmp_path) == frozenset({11})
    assert smt_siblings(4, tmp_path) == frozenset()  # no topology: no siblings known


@pytest.mark.parametrize(("cpus", "gpus"), [(16, 0), (7, 2), (3, 1)])
def test_no_plan_without_gpus_or_with_too_few_cpus(cpus, gpus):
    assert CpuPlan.for_node(cpus=set(range(cpus)), num_gpus=gpus) is None


def test_gpu_count_reads_the_driver_listing(tmp_path):
    for bus in ("0000:19:00.0", "0000:3b:00.0"):
        (tmp_path / bus).mkdir()
    assert node_gpu_count(tmp_path) == 2
    assert node_gpu_count(tmp_path / "absent") == 0


@pytest.mark.parametrize(("value", "index"), [("3", 3), ("3,4", 3), (" 1 ", 1), ("GPU-5d3c", 0), ("", 0)])
def test_visible_gpu_index(value, index):
    assert visible_gpu_index({"CUDA_VISIBLE_DEVICES": value}) == index
    assert visible_gpu_index({}) == 0


def _threads_affinity(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()]


def test_pin_process_moves_every_thread_of_a_running_process():
    code = "import threading, time\nfor _ in range(3): threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\nprint('up', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        cpu = max(os.sched_getaffinity(0))
        pin_process({cpu}, child.pid)
        affinities = _threads_affinity(child.pid)
        assert len(affinities) == 4 and all(a == {cpu} for a in affinities)
    finally:
        child.kill()
        child.wait()


def test_engine_core_runs_on_its_cpu_and_still_generates(llama_ckpt, hf_greedy):
    cpu = min(os.sched_getaffinity(0))
    config = EngineConfig(model=str(llama_ckpt), dtype="float32", device="cpu", cache=CacheConfig(block_size=4, num_blocks=64))
    client = EngineCoreClient(dataclasses.replace(config, core_cpu=cpu))
    try:
        # Every thread the core has by now (torch's, the receiver) started after the pin.
        assert all(a == {cpu} for a in _threads_affinity(client._process.pid))

        async def one() -> list[int]:
            tokens = []
            async for out in client.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), "r"):
                tokens = out.outputs[0].token_ids
            return list(tokens)

        assert asyncio.run(one()) == hf_greedy("tiny-llama", [5, 6, 7], 4)
    finally:
        client.shutdown()


def test_core_cpu_must_be_a_cpu_number():
    with pytest.raises(ConfigError, match="core_cpu"):
        EngineConfig(model="preset:tiny-llama", core_cpu=-1)
