"""W2's kept ratio from interleaved passes: each Serve pass against the direct passes around it.

Why. The GPU hosts drift: one path's passes at one level differed by up to 2x within a run
(BENCHMARKS.md, W2), and the drift is slow next to a pass. `--interleave --rounds R` runs direct,
Serve, direct, ... so that Serve pass i sits between direct passes i and i + 1; the ratio of that
pass to their mean cancels what the host did around it. The headline figure stays the ratio of the
two paths' means; the paired ratios give it a spread: their mean and a percentile bootstrap
interval over the rounds (seeded, so a report reads the same twice).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class KeptRatio:
    of_means: float  # mean Serve tok/s over mean direct tok/s
    paired_mean: float  # mean over rounds of Serve pass i / mean(direct i, direct i + 1)
    low: float  # the bootstrap interval of paired_mean
    high: float


def paired_ratios(direct: list[float], serve: list[float]) -> list[float]:
    """Serve pass i over the mean of direct passes i and i + 1 (the ones run just before and after it)."""
    if len(direct) != len(serve) + 1:
        raise ValueError(f"interleaved passes: one direct pass more than Serve's, got {len(direct)} and {len(serve)}")
    return [s / ((direct[i] + direct[i + 1]) / 2) for i, s in enumerate(serve)]


def kept_ratio(direct: list[float], serve: list[float], confidence: float = 0.95, resamples: int = 4000,
               seed: int = 0) -> KeptRatio:
    ratios = paired_ratios(direct, serve)
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1.0 - confidence) / 2
    low = means[int(tail * (resamples - 1))]
    high = means[int((1.0 - tail) * (resamples - 1))]
    return KeptRatio(statistics.fmean(serve) / statistics.fmean(direct), statistics.fmean(ratios), low, high)
