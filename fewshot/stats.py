"""Confidence intervals for few-shot numbers: the mean over seeded episodes and paired differences.

Every configuration of an evaluation is scored on the same seeded supports, so two configurations are compared
per seed (a paired t-interval on the differences, Student 1908) rather than by overlapping intervals, which
wastes most of the pairing: supports that are hard for one backbone are usually hard for the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def t_interval(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t confidence interval of the mean (0 for a single value)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, 0.0
    half = float(stats.t.ppf(0.975, df=len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return mean, half


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over matched episodes: mean, 95% t-interval half-width, and how many episodes each side won."""

    mean: float
    ci95: float
    wins: int  # episodes where a > b
    losses: int  # episodes where a < b
    n: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (needs at least 2 episodes)."""
        return self.n >= 2 and abs(self.mean) > self.ci95


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """The paired difference ``a - b`` of two score lists measured on the same episodes, in the same order."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"paired scores need two equal-length, non-empty lists, got {x.shape} and {y.shape}")
    d = x - y
    mean, half = t_interval(d)
    return PairedDifference(mean, half, int((d > 0).sum()), int((d < 0).sum()), len(d))
