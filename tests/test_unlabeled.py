"""The unlabeled pool of a pool head: TRAIN outside the support plus the extra images, capped, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.errors import FewshotError
from fewshot.unlabeled import pool_rows, with_pool


def test_pool_is_train_outside_the_support_plus_the_extra_images() -> None:
    support = np.array([1, 4])
    inside, extra = pool_rows(6, support, 3, max_images=100, seed=0)
    assert inside.tolist() == [0, 2, 3, 5] and extra.tolist() == [0, 1, 2]


def test_pool_cap_is_a_seeded_subset_of_both_parts() -> None:
    support = np.arange(0, 100, 10)
    a = pool_rows(100, support, 400, max_images=50, seed=7)
    b = pool_rows(100, support, 400, max_images=50, seed=7)
    c = pool_rows(100, support, 400, max_images=50, seed=8)
    assert len(a[0]) + len(a[1]) == 50
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert not set(a[0]) & set(support.tolist())
    assert len(a[1]) > len(a[0])  # drawn over both parts alike: the larger part keeps more


def test_with_pool_marks_the_pool_minus_one() -> None:
    x_train = np.arange(12, dtype=np.float32).reshape(6, 2)
    y_train = np.array([0, 1, 0, 1, 0, 1])
    x_extra = np.full((2, 2), -5.0, dtype=np.float32)
    X, y = with_pool(x_train, y_train, np.array([0, 3]), x_extra, max_images=100, seed=0)
    assert y.tolist() == [0, 1, -1, -1, -1, -1, -1, -1]
    np.testing.assert_array_equal(X[:2], x_train[[0, 3]])
    np.testing.assert_array_equal(X[-2:], x_extra)
    with pytest.raises(FewshotError, match="max_images"):
        pool_rows(6, np.array([0]), 0, max_images=-1, seed=0)
