"""Arrival counters: the last of a group of programs to finish does the group's closing work.

Several kernels split one result over programs and let the last to arrive combine the parts (the
int4 kernels' split-K ending, engine/quant/split_k.py; decode attention's splits; the greedy
argmax's chunks), so that no second kernel is launched. The protocol, in one place:

* each program stores its part, then `last_to_arrive` bumps the group's counter once: the barrier
  first makes every thread's stores land before the bump, and acq_rel at GPU scope makes all the
  group's parts visible to whichever program sees the last count;
* that program reads the parts with cache_modifier=".cg" (from the L2, never a stale line of its
  SM's L1), writes the result and calls `reset_arrivals`, so the counters are zero again for the
  next call: a CUDA graph replays with no clearing of them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def last_to_arrive(counter, ARRIVALS: tl.constexpr):
    """Counts this program's arrival on `counter` (its stores done); true for the ARRIVALS-th."""
    tl.debug_barrier()
    return tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == ARRIVALS - 1


@triton.jit
def reset_arrivals(counter):
    """Zero again, by the last to arrive once it has read every part."""
    tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
