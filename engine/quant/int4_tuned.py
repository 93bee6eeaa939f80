"""Measured int4 tiles for batch 1: per GPU model, the fastest config of each layer shape.

Why. Triton's autotuner picks a batch-1 int4 config at engine start from its own timing of each
candidate, one launch at a time; for kernels of 7-100 us that timing ranks configs differently
from the model, where each layer's weight streams from HBM once per step inside a CUDA graph (on
the H200 it chose configs 12-35% slower than the best for four of the five Llama-3-8B layers).
bench/int4_mma_sweep.py times every config the model's way and writes the winners here, one JSON
file per GPU model (`tuned/<torch.cuda.get_device_name() with spaces as _>.json`), as vLLM ships
its fused-MoE configs. A shape or GPU without an entry is autotuned as before.

File format: {"group": {"<N>x<K>": {"BLOCK_N": .., "STEP_GROUPS": .., ["COLUMNS": ..,] "SPLIT_K": ..,
"num_warps": .., "num_stages": ..}}}; an entry with COLUMNS runs the one-row kernel.

ENGINE_INT4_TUNED=0 in the environment ignores the tables (A/B runs).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

TABLE_DIR = Path(__file__).parent / "tuned"


def table_path(device_name: str) -> Path:
    return TABLE_DIR / f"{device_name.replace(' ', '_')}.json"


def shape_key(n: int, k: int) -> str:
    return f"{n}x{k}"


def tuned_config(device: torch.device, n: int, k: int, group: int) -> dict | None:
    """The measured batch-1 config for an [n, k] int4 weight in groups of `group` on `device`, or None."""
    if device.type != "cuda" or os.environ.get("ENGINE_INT4_TUNED") == "0":
        return None
    table = _table(device.index if device.index is not None else torch.cuda.current_device())
    entry = table.get(str(group), {}).get(shape_key(n, k))
    return dict(entry) if entry is not None else None


@functools.lru_cache(maxsize=None)
def _table(index: int) -> dict:
    path = table_path(torch.cuda.get_device_name(index))
    return json.loads(path.read_text()) if path.exists() else {}
