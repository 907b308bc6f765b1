"""Per-step schedules as in DINO's ``utils.cosine_scheduler`` (Caron et al. 2021), counted in optimiser steps.

Each function returns a float64 array with one value per step, so ``schedule[step]`` is the value used at that
step. Unlike DINO's, the cosine reaches ``final`` exactly at the last step.
"""

from __future__ import annotations

import numpy as np


def cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then cosine from ``base`` to ``final``.

    The warm-up's last step already uses ``base`` (as DINO's ``np.linspace``); the cosine part starts at ``base``
    and ends at ``final`` on step ``total_steps - 1`` (a one-step cosine part is just ``base``).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be ≥ 1, got {total_steps}")
    warmup_steps = max(0, min(int(warmup_steps), total_steps))
    warm = np.linspace(warmup_start, base, warmup_steps)
    n = total_steps - warmup_steps
    progress = np.arange(n) / max(n - 1, 1)  # 0 .. 1 inclusive
    decay = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([warm, decay]).astype(np.float64)


def linear_warmup(start: float, end: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """``start`` to ``end`` linearly over ``warmup_steps`` (inclusive), then ``end`` (DINO's teacher temperature)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be ≥ 1, got {total_steps}")
    warmup_steps = max(0, min(int(warmup_steps), total_steps))
    return np.concatenate([np.linspace(start, end, warmup_steps), np.full(total_steps - warmup_steps, end)])


def capped_steps(epochs: float, steps_per_epoch: int, total_steps: int, max_fraction: float) -> int:
    """``epochs`` worth of steps, but at most ``max_fraction`` of the run (small-data runs are short)."""
    return int(max(0, min(round(epochs * steps_per_epoch), round(max_fraction * total_steps))))
