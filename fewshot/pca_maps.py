"""PCA feature maps of ViT patch tokens, as popularised by DINOv2 (Oquab et al. 2023, Fig. 1 and Sec. 7.4).

One PCA is fitted on the patch features of all the given images together (prefix tokens excluded), so colours
mean the same thing across images. Its first component separates foreground from background: DINOv2 thresholds
it and keeps the patches on one side. PCA's sign is arbitrary, so we orient the component so that the
foreground (positive side, threshold 0 = the mean patch) is the minority of patches: objects usually cover less
than half of a photo. DINOv2 then fits a second PCA on the foreground patches only and shows its first three
components as RGB; we return both that and the first three components of the PCA on all patches. Each component
is min-max scaled over all images to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PCAMaps:
    first: np.ndarray  # (N, gh, gw) first component, oriented so the foreground is positive
    foreground: np.ndarray  # (N, gh, gw) bool: first component > 0
    rgb: np.ndarray  # (N, gh, gw, 3) in [0, 1]: first three components of the PCA on all patches
    rgb_foreground: np.ndarray  # (N, gh, gw, 3) in [0, 1]: second PCA on foreground patches; background 0
    explained_variance_ratio: list[float]  # of the PCA on all patches


def pca_feature_maps(features: np.ndarray, seed: int = 0) -> PCAMaps:
    """Patch features (N, gh, gw, D) of N images -> PCA maps (see the module docstring)."""
    n, gh, gw, d = features.shape
    x = features.reshape(-1, d).astype(np.float32)  # (N*gh*gw, D)
    comps, ratio = _pca(x, seed)  # (P, 3)
    first = comps[:, 0]
    if (first > 0).sum() > first.size / 2:
        first = -first  # the foreground is the minority of patches
        comps[:, 0] = first
    fg = first > 0
    rgb_fg = np.zeros((x.shape[0], 3), dtype=np.float32)
    if fg.sum() >= 2:
        rgb_fg[fg] = _minmax(_pca(x[fg], seed)[0])
    return PCAMaps(
        first.reshape(n, gh, gw),
        fg.reshape(n, gh, gw),
        _minmax(comps).reshape(n, gh, gw, 3),
        rgb_fg.reshape(n, gh, gw, 3),
        ratio,
    )


def _pca(x: np.ndarray, seed: int) -> tuple[np.ndarray, list[float]]:
    """Projections on the first three principal components (P, 3), zero-padded when fewer exist."""
    from sklearn.decomposition import PCA

    k = min(3, x.shape[0], x.shape[1])
    out = np.zeros((x.shape[0], 3), dtype=np.float32)
    if k == 0 or x.shape[0] < 2:
        return out, []
    pca = PCA(n_components=k, random_state=seed)
    out[:, :k] = pca.fit_transform(x)
    return out, [float(r) for r in pca.explained_variance_ratio_]


def _minmax(c: np.ndarray) -> np.ndarray:
    """Scale each column to [0, 1] over all rows (constant columns become 0)."""
    lo, hi = c.min(axis=0, keepdims=True), c.max(axis=0, keepdims=True)
    return ((c - lo) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)
