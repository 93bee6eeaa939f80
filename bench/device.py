"""Small device helpers shared by the benchmark scripts."""

from __future__ import annotations

import gc

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
