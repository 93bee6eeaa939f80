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
from engine.cpu_affinity import CpuPlan, node_gpu_count, pin_process, visible_gpu_index


def test_plan_gives_each_gpu_one_of_the_highest_cpus():
    plan = CpuPlan.for_node(cpus=set(range(16)), num_gpus=2)
    assert plan.engine_cpus == (15, 14)
    assert plan.others == frozenset(range(14))
    assert [plan.core_cpu(i) for i in (0, 1, 2, -1)] == [15, 14, None, None]


def test_plan_follows_the_allowed_cpus_not_their_count():
    plan = CpuPlan.for_node(cpus={2, 3, 5, 8}, num_gpus=1)
    assert plan.engine_cpus == (8,)
    assert plan.others == frozenset({2, 3, 5})


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


def test_engine_core_runs_on_its_cpu_and_still_generates(llama_ckpt):
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


    finally:
        client.shutdown()


def test_core_cpu_must_be_a_cpu_number():
    with pytest.raises(ConfigError, match="core_cpu"):
        EngineConfig(model="preset:tiny-llama", core_cpu=-1)
