"""The unlabeled pool that pool heads (``spread``, ``selftrain``, ``HEAD+center``) see beside the support.

The pool is TRAIN's images outside the support, their labels hidden, plus the ``--unlabeled`` images (the
``pool.unlabeled`` config key), capped at ``pool.max_images`` by a seeded random subset so that a large unlabeled
folder keeps each fit to seconds. Rows are passed in scikit-learn's semi-supervised convention: support rows with
their labels, pool rows with -1.
"""

from __future__ import annotations

import numpy as np

from fewshot.errors import FewshotError


def pool_rows(
    n_train: int, support: np.ndarray, n_extra: int, max_images: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(TRAIN rows outside ``support``, rows of the extra unlabeled features) in the pool, at most ``max_images``
    in all: a seeded random subset (the same ``seed`` gives the same pool), each part sorted."""
    if max_images < 0:
        raise FewshotError(f"pool.max_images must be 0 or more, got {max_images}")
    outside = np.setdiff1d(np.arange(n_train), support)  # (n_train - |support|,)
    extra = np.arange(n_extra)
    total = len(outside) + n_extra
    if total <= max_images:
        return outside, extra
    keep = np.sort(np.random.default_rng(seed).choice(total, size=max_images, replace=False))
    return outside[keep[keep < len(outside)]], extra[keep[keep >= len(outside)] - len(outside)]


def with_pool(
    x_train: np.ndarray,
    y_train: np.ndarray,
    support: np.ndarray,
    x_extra: np.ndarray | None,
    max_images: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Support rows with their labels, then the pool rows labelled -1: the ``fit`` input of a pool head."""
    n_extra = 0 if x_extra is None else len(x_extra)
    inside, extra = pool_rows(len(x_train), support, n_extra, max_images, seed)
    parts = [x_train[support], x_train[inside]]  # (K, D), (P1, D)
    if x_extra is not None:
        parts.append(x_extra[extra])  # (P2, D)
    X = np.concatenate(parts).astype(np.float32, copy=False)  # (K + P, D)
    y = np.concatenate([y_train[support], np.full(len(inside) + len(extra), -1, dtype=np.int64)])
    return X, y
