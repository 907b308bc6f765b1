"""Cold-start selection: deterministic per seed, blind to labels, and each strategy doing what its paper says."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.config import Config, SelectConfig
from fewshot.episodes import chosen_support
from fewshot.errors import FewshotError
from fewshot.selection import STRATEGIES, purity_radius, select, typicality


def mixture(sizes: tuple[int, ...], dim: int = 8, spread: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tight Gaussian clusters around random unit directions, far apart; rows shuffled. Returns (X, cluster)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 3.0  # orthogonal: after L2 normalisation the clusters stay apart
    cluster = np.repeat(np.arange(len(sizes)), sizes)
    X = centres[cluster] + spread * rng.normal(size=(len(cluster), dim))
    order = rng.permutation(len(cluster))
    return X[order].astype(np.float32), cluster[order]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selection_is_deterministic_per_seed(strategy: str) -> None:
    X, _ = mixture((30, 20, 25, 15))
    a = select(X, 6, strategy, seed=3, n_classes=4)
    b = select(X, 6, strategy, seed=3, n_classes=4)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert len(set(a.indices.tolist())) == 6  # no image twice


def test_evaluate_selection_never_reads_labels() -> None:
    """The same features with the labels shuffled give the same picks: only the revealed labels differ."""
    X, cluster = mixture((40, 30, 30, 20), seed=1)
    y = cluster.copy()
    shuffled = np.random.default_rng(0).permutation(y)
    cfg = Config()
    for strategy in ("typiclust", "probcover", "kcenter"):
        a = chosen_support(X, y, shots=2, seed=5, strategy=strategy, cfg=cfg)
        b = chosen_support(X, shuffled, shots=2, seed=5, strategy=strategy, cfg=cfg)
        np.testing.assert_array_equal(a, b)
        assert len(a) == 2 * 4


def test_typiclust_picks_the_most_typical_image_of_every_cluster() -> None:
    sizes = (40, 12, 25, 8, 30, 18)
    X, cluster = mixture(sizes, spread=0.08, seed=2)
    sel = select(X, len(sizes), "typiclust", seed=0)
    assert sorted(cluster[sel.indices].tolist()) == list(range(len(sizes)))  # one per cluster
    # visited from the largest cluster down (none is labelled yet)
    assert [sizes[c] for c in cluster[sel.indices]] == sorted(sizes, reverse=True)
    from sklearn.preprocessing import normalize

    Z = normalize(X)
    for i in sel.indices:  # each pick is the densest image of its cluster: typicality over 20 (or size // 2) NN
        members = np.flatnonzero(cluster == cluster[i])
        k = min(20, len(members) // 2)
        dist = np.linalg.norm(Z[members, None] - Z[None, members], axis=2)  # (n, n)
        mean_nn = np.sort(dist, axis=1)[:, 1 : k + 1].mean(axis=1)
        assert members[np.argmin(mean_nn)] == i


def test_typiclust_skips_covered_clusters_and_tiny_outliers() -> None:
    X, cluster = mixture((30, 30, 30, 3), seed=3)  # the 3-image cluster is below min_cluster_size = 5
    labelled = np.flatnonzero(cluster == 0)[:1]  # cluster 0 already holds a labelled image
    sel = select(X, 2, "typiclust", seed=0, exclude=labelled)
    assert sorted(cluster[sel.indices].tolist()) == [1, 2]
    assert not set(sel.indices) & set(labelled)


def test_typicality_is_the_inverse_mean_distance_to_the_nearest_neighbours() -> None:
    X = np.array([[0.0], [1.0], [3.0], [6.0]])
    # row 1: neighbours at 1 (row 0) and 2 (row 2) -> mean 1.5
    np.testing.assert_allclose(typicality(X, 2), 1 / (np.array([2.0, 1.5, 2.5, 4.0]) + 1e-5))


def test_probcover_covers_greedily_with_its_radius() -> None:
    # unit vectors at angles (degrees): a dense group of 4, a pair, and a lone point
    angles = np.radians([0, 2, 4, 6, 60, 62, 150])
    X = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    # chords: 2 degrees apart = 0.035 (inside a ball of 0.06), 4 degrees = 0.070 (outside). Balls hold
    # {0,1}, {0,1,2}, {1,2,3}, {2,3}, {4,5}, {4,5}, {6}: row 1 or 2 covers 3 first, then the pair (row 4 or 5, 2
    # new images), then one ball with the last image of the group (1 new; or the lone point: a tie)
    for seed in range(5):
        sel = select(X, 3, "probcover", seed=seed, cfg=SelectConfig(probcover_delta=0.06))
        assert sel.indices[0] in (1, 2) and sel.indices[1] in (4, 5)
        assert sel.scores.tolist() == [3.0, 2.0, 1.0]
        assert sel.details["coverage"] == pytest.approx(6 / 7)


def test_probcover_breaks_ties_at_random_not_in_file_order() -> None:
    """Once every ball holds one image, the picks must not follow the row order (in an ImageFolder: the classes)."""
    X = np.random.default_rng(0).normal(size=(200, 16))
    sel = select(X, 20, "probcover", seed=1, cfg=SelectConfig(probcover_delta=0.01))
    assert set(sel.scores) == {1.0} and max(sel.indices) > 100


def test_probcover_radius_keeps_alpha_of_the_balls_pure() -> None:
    X, cluster = mixture((50, 50, 50), spread=0.1, seed=4)
    from sklearn.preprocessing import normalize

    Z = normalize(X)
    delta, purity = purity_radius(Z, cluster, alpha=0.95)
    dist = np.linalg.norm(Z[:, None] - Z[None], axis=2)
    other = np.where(cluster[:, None] != cluster[None], dist, np.inf).min(axis=1)
    assert purity == np.mean(other > delta) >= 0.95
    assert np.mean(other > delta + 0.01) < 0.95 or delta == 2.0  # the largest such radius on the 0.01 grid


def test_kcenter_takes_the_farthest_image_each_time() -> None:
    X = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.0]])
    sel = select(X, 2, "kcenter", exclude=np.array([0]))
    assert sel.indices.tolist() == [3, 2]  # opposite of the labelled image first, then the orthogonal one


def test_selection_errors_are_one_line() -> None:
    X, _ = mixture((10, 10))
    with pytest.raises(FewshotError, match="only 20 are not yet labelled"):
        select(X, 21, "typiclust")
    with pytest.raises(FewshotError, match="unknown selection strategy 'best'"):
        select(X, 2, "best")
    with pytest.raises(FewshotError, match="--classes N"):
        select(X, 2, "probcover")
    with pytest.raises(FewshotError, match="at least 1"):
        select(X, 0, "random")
