"""PCA feature maps: shapes, colour range, and the first component finding a planted foreground."""

from __future__ import annotations

import numpy as np

from fewshot.pca_maps import pca_feature_maps


def planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features (3, 6, 5, 16) whose patches in a small region share an offset: the 'object'."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(3, 6, 5, 16)).astype(np.float32)
    fg = np.zeros((3, 6, 5), bool)
    fg[:, 1:4, 1:3] = True  # 6 of 30 patches per image
    feats[fg] += 6.0 * rng.normal(size=16).astype(np.float32)
    return feats, fg


def test_shapes_and_ranges() -> None:
    feats, _ = planted()
    maps = pca_feature_maps(feats)
    assert maps.first.shape == maps.foreground.shape == (3, 6, 5)
    assert maps.rgb.shape == maps.rgb_foreground.shape == (3, 6, 5, 3)
    assert maps.rgb.min() == 0.0 and maps.rgb.max() == 1.0
    assert (maps.rgb_foreground[~maps.foreground] == 0).all()
    assert len(maps.explained_variance_ratio) == 3


def test_first_component_finds_the_minority_foreground() -> None:
    feats, fg = planted()
    maps = pca_feature_maps(feats)
    assert (maps.foreground == fg).all()
    flipped = pca_feature_maps(-feats)  # PCA's sign is arbitrary; the orientation rule is not
    assert (flipped.foreground == fg).all()


def test_deterministic_and_tiny_inputs() -> None:
    feats, _ = planted()
    a, b = pca_feature_maps(feats), pca_feature_maps(feats)
    assert np.array_equal(a.rgb, b.rgb)
    one = pca_feature_maps(np.ones((1, 1, 1, 8), np.float32))  # a single patch: nothing to decompose
    assert one.rgb.shape == (1, 1, 1, 3) and not one.foreground.any()
    two = pca_feature_maps(np.random.default_rng(0).normal(size=(1, 1, 2, 4)))
    assert two.foreground.sum() <= 1
