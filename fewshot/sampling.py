"""Seeded, class-balanced k-shot sampling: the same seed always gives the same support set."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fewshot.errors import FewshotError


def sample_support(labels: np.ndarray, shots: int, seed: int, classes: Sequence[str]) -> np.ndarray:
    """Indices of ``shots`` examples per class, drawn without replacement with ``np.random.default_rng(seed)``.

    Every class in ``classes`` must have at least ``shots`` labelled examples; otherwise a one-line error
    names the class and its count. Indices are returned sorted, so the support order does not depend on the
    class order.
    """
    if shots < 1:
        raise FewshotError(f"shots must be at least 1, got {shots}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c, name in enumerate(classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < shots:
            raise FewshotError(
                f"class '{name}' has {len(pool)} labelled image(s), fewer than the {shots} shots asked for; "
                f"lower --shots or add images to that class"
            )
        picked.append(rng.choice(pool, size=shots, replace=False))
    return np.sort(np.concatenate(picked))
