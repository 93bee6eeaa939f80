"""Programmatic dependent launch (PDL) for the decode step's own Triton kernels.

Why. A batch-1 decode step of the 8B model is ~320 small kernels, and each one's launch, ramp-up and
tail leave the memory idle: an empty kernel costs 0.9 us in a CUDA graph, and the int4 products of
the small projections run at a third of the copy rate. With PDL (compute capability 9.0 and up) a
kernel launched with it may start before the kernel ahead of it has finished: its programs are
placed once every program of that kernel has called `gdc_launch_dependents` (or exited), do the part
that needs nothing from it (the int4 kernel: ask the L2 for its first weights), then `gdc_wait`
until it has completed and its writes are visible.

The rule for every kernel launched with PDL: `gdc_wait` comes before its first access to memory that
an earlier kernel launched with PDL writes, and before every store. Reads of what no such kernel
writes may come first: the weights, the rotary tables, the step's inputs (staged by a copy before
the step's first kernel) and the KV cache of earlier steps (decode attention reads them there). `enter` is the signal that lets the
next kernel be placed, then that wait. Waits chain: a kernel's wait returns after the kernel
ahead completed, and that one completed only after its own wait returned. Kernels launched without
PDL (torch's, cuBLAS) are ordered as always; the instructions are no-ops without it.

Only small launches use it (at most PDL_MAX_ROWS tokens): at batch 1 (W3, the 8B model in int4)
it took the step from 366.6 to 417.5 tok/s on one H200; on the whole W1 run (up to 256 sequences a
step) it cost 2% (29.4k and 30.0k against 29.9k and 30.7k tok/s, alternating runs), where the
kernels are longer than the gaps it hides and the early-placed programs only hold resources.

ENGINE_PDL=0 in the environment turns it off (A/B runs, or a driver that cannot capture PDL
launches in a CUDA graph).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


MIN_CUDA = (12, 3)  # the runtime that captures programmatic launches into CUDA graphs as such


def pdl_enabled(device: torch.device) -> bool:
    """Whether this process launches the decode kernels on `device` with PDL."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("ENGINE_PDL") == "0":
        return False
    return _device_supports_pdl(device.index if device.index is not None else torch.cuda.current_device())


def cuda_runtime_supports_pdl(version: str | None) -> bool:
    """Whether torch's CUDA runtime ("12.8", "13.0"; None for a CPU build) is MIN_CUDA or newer."""
    if not version:
        return False
    parts = [int(part) for part in version.split(".")] + [0]
    return (parts[0], parts[1]) >= MIN_CUDA


@functools.lru_cache(maxsize=None)
def _device_supports_pdl(index: int) -> bool:
    """Hopper or newer, under a CUDA runtime that captures PDL: fixed for the process, so asked once
    per device rather than on every launch."""
    return cuda_runtime_supports_pdl(torch.version.cuda) and torch.cuda.get_device_capability(index)[0] >= 9


PDL_MAX_ROWS = 8  # tokens of a launch; measured at 1 (gain) and up to 256 (loss), not between


def use_pdl(device: torch.device, rows: int) -> bool:
    """Whether a launch over `rows` tokens on `device` goes with PDL."""
    return rows <= PDL_MAX_ROWS and pdl_enabled(device)


def launch_options(device: torch.device, rows: int) -> dict:
    """The kernel arguments that launch one of the kernels below with PDL or without: its PDL
    constexpr (which compiles `enter` in) and Triton's launch flag."""
    on = use_pdl(device, rows)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def enter(PDL: tl.constexpr):
    """Lets the next kernel be placed, then waits for the kernel ahead (its writes visible).

    Signalling first lets the kernel after this one ask for its weights while the kernel ahead of
    this one still runs (W3 in BENCHMARKS.md: 412 against 406 tok/s with the wait first); it is safe
    because every kernel waits before it touches what another writes, and a wait returns only
    after the kernel ahead, whose own wait came first, has completed."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def prefetch_l2(ptrs):
    """One L2 prefetch per address of `ptrs` (the 128-byte line that holds it). Read-only data
    only: it runs before `enter`. Plain per-line prefetches, not Hopper's bulk prefetch of a
    whole row, which ptxas issues one address at a time per warp and was no faster."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0 unused", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
