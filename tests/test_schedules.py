"""Per-step schedules: lengths, warm-ups and end points as DINO's cosine_scheduler."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.schedules import capped_steps, cosine, linear_warmup


@pytest.mark.parametrize("total,warmup", [(1, 0), (10, 0), (10, 3), (100, 10), (7, 7)])
def test_cosine_has_one_value_per_step_and_reaches_its_ends(total: int, warmup: int) -> None:
    s = cosine(0.5, 0.01, total, warmup, warmup_start=0.0)
    assert s.shape == (total,)
    if warmup:
        assert s[0] == 0.0
        assert s[warmup - 1] == pytest.approx(0.5)  # the warm-up's last step already uses the peak
        np.testing.assert_allclose(np.diff(s[:warmup]), 0.5 / max(warmup - 1, 1))
    if total - warmup >= 2:
        assert s[warmup] == pytest.approx(0.5)
        assert s[-1] == pytest.approx(0.01)
        assert np.all(np.diff(s[warmup:]) <= 1e-12)  # monotone decay after the warm-up


def test_cosine_increasing_schedule_ends_at_one() -> None:
    m = cosine(0.996, 1.0, 500)  # the teacher momentum: 0.996 -> 1
    assert m[0] == pytest.approx(0.996) and m[-1] == pytest.approx(1.0)
    assert np.all(np.diff(m) >= 0)
    assert m[250] == pytest.approx(0.998, abs=1e-5)  # half way = the mean of the ends


def test_linear_warmup_then_constant() -> None:
    t = linear_warmup(0.04, 0.07, 20, 5)
    assert t.shape == (20,)
    np.testing.assert_allclose(t[:5], np.linspace(0.04, 0.07, 5))
    assert np.all(t[5:] == 0.07)
    assert np.all(linear_warmup(0.04, 0.07, 3, 10) == np.linspace(0.04, 0.07, 3))  # warm-up capped at the run


def test_capped_steps_takes_the_smaller_of_epochs_and_fraction() -> None:
    assert capped_steps(10, 1250, 125_000, 0.1) == 12_500  # ImageNet: 10 epochs
    assert capped_steps(10, 40, 800, 0.1) == 80  # 20-epoch run: capped at 10% of it
    assert capped_steps(1, 3, 1000, 0.1) == 3
