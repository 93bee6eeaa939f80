"""Small device helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def sync(device: torch.device) -> None:
    """Waits for queued device work, so a host clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Releases what the last engine or model held before the next one sizes itself."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def graph_seconds_per_call(calls, replays: int = 10) -> float:
    """Median seconds per call of `calls` (thunks, run in order) captured once in a CUDA graph and
    replayed `replays` times: no launch overhead. Each call runs once first (compiles, warm-up)."""
    for call in calls:
        call()
    return graph_replay(calls, replays)[0]


def graph_replay(calls, replays: int = 10) -> tuple[float, list]:
    """(median seconds per call, what each call returned in the last replay) of `calls` captured
    once in a CUDA graph and replayed `replays` times. The calls must have run before (compiles)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times), outs


def back_to_back_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Milliseconds per replay of a captured `graph` replayed `replays` times back to back, between
    one pair of events: the GPU's time with no host work or sync between replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def shapes_cli(doc: str, argv: list[str] | None):
    """(args, cuda device) for the bench scripts that walk one preset's layer shapes: --preset, --json."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv), torch.device("cuda")


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces this run: `python -m <module> <its arguments>`."""
    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def write_json(results: dict, path: str | Path | None) -> None:
    """results as JSON at path (its folder made first); nothing without a path."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1))
