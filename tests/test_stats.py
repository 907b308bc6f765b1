"""Intervals checked by hand: Student-t quantiles and paired differences on a small table."""

from __future__ import annotations

import math

import pytest

from fewshot.stats import paired_difference, t_interval


def test_t_interval_matches_hand_computed_quantile() -> None:
    mean, half = t_interval([0.5, 0.6, 0.7, 0.8])
    # t_{0.975, df=3} = 3.182446; s = sqrt(0.05 / 3); half-width = t · s / sqrt(4)
    assert mean == pytest.approx(0.65)
    assert half == pytest.approx(3.182446 * math.sqrt(0.05 / 3) / 2, rel=1e-6)
    assert t_interval([0.42]) == (pytest.approx(0.42), 0.0)


def test_paired_difference_by_hand() -> None:
    # per-seed accuracies of two backbones on the same 5 supports
    a = [0.70, 0.62, 0.81, 0.55, 0.66]
    b = [0.60, 0.60, 0.71, 0.57, 0.56]
    d = paired_difference(a, b)
    # differences 0.10, 0.02, 0.10, -0.02, 0.10: mean 0.06, s² = Σ(d - 0.06)² / 4 = (4·0.0016 + 0.0064) / 4 = 0.0032
    # t_{0.975, df=4} = 2.776445; half-width = t · sqrt(0.0044) / sqrt(5)
    assert d.mean == pytest.approx(0.06)
    assert d.ci95 == pytest.approx(2.776445 * math.sqrt(0.0032) / math.sqrt(5), rel=1e-6)
    assert (d.wins, d.losses, d.n) == (4, 1, 5)
    assert not d.significant  # half-width 0.070 > 0.06: the interval includes 0
    assert paired_difference([x + 0.05 for x in b], b).significant  # a constant gain: zero variance
    assert paired_difference(b, a).mean == pytest.approx(-0.06)


def test_paired_difference_needs_matched_lists() -> None:
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([0.1, 0.2], [0.1])
    single = paired_difference([0.5], [0.4])
    assert single.ci95 == 0.0 and not single.significant
