"""Pearson's chi-square by hand (scipy is not a dependency), for the sampling tests."""

from __future__ import annotations

import math

import torch


def chi2_critical(dof: int, z: float = 3.090) -> float:
    """Upper critical value of chi-square(dof) at p = 0.001 (z: the normal quantile)."""
    c = 2 / (9 * dof)
    return dof * (1 - c + z * math.sqrt(c)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom (cells with expected count < 5 pooled)."""
    n = counts.sum().item()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small].float(), counts[small].float().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return ((obs - exp) ** 2 / exp).sum().item(), int(keep.sum().item()) - 1
