"""Which images to label first: cold-start selection on self-supervised features, never on labels.

At budgets of a few labels per class, picking *typical* and *diverse* images beats random picks (Hacohen et al.,
"Active Learning on a Budget", ICML 2022; Yehuda et al., "Active Learning Through a Covering Lens", NeurIPS 2022).
Every strategy sees only the features (L2-normalised, so distances are cosine geometry, as the heads use) and,
optionally, which rows are already labelled (``exclude``); labels never enter, so a selection can be made before
any image is labelled, and shuffling labels cannot change it.

- ``typiclust`` (Hacohen et al. 2022): k-means into ``min(|L| + B, max_clusters)`` clusters (the paper caps them at
  500; k-means for up to 50 clusters, mini-batch k-means above, as the authors' code); clusters with fewer than
  ``min_cluster_size`` images are left out (as the authors' code: they are outliers); the clusters are visited in
  order of fewest labelled images, then largest size, cycling when the budget exceeds them; from each the most
  *typical* unlabelled image is taken: typicality = 1 / (mean distance to its K nearest neighbours in the
  cluster), K = min(20, cluster size // 2).
- ``probcover`` (Yehuda et al. 2022): balls of radius delta around every image; greedy maximum coverage: take the
  image whose ball holds the most not-yet-covered images (ties broken at random, seeded), mark them covered,
  repeat. Delta is the largest radius (0.01 steps) at which a share ``alpha`` = 0.95 of the balls stay *pure* with
  respect to k-means pseudo-labels with as many clusters as classes (the paper's rule). The ball graph is a sparse
  radius-neighbours graph, so memory grows with the edges, not with N².
- ``kcenter``: greedy k-centre (Sener & Savarese 2018, "core-set"): the image farthest from every chosen or
  labelled image, repeatedly. A diversity baseline.
- ``random``: a seeded uniform draw (``evaluate`` keeps its class-balanced draw for the random baseline).

Why not scikit-activeml (BSD-3, which has TypiClust and ProbCover): evaluated at 1.0.1. Its weight is small (2.5 MB
+ makefun), its picks are deterministic per seed and need no labels, but (1) ``import skactiveml.pool`` imports
torch (its classifier wrappers), seconds on a CPU before any work; (2) its ProbCover holds the dense N x N distance
matrix plus boolean copies (+462 MB peak at N = 8,000; quadratic, so ~6 GB at 30,000 images) and rescans all of it
per pick; (3) its TypiClust has no cluster cap, uses 5 neighbours (the paper 20) and breaks ties at random; (4) its
ProbCover infers the class count from the labels. The strategies are a few dozen lines over scikit-learn's KMeans,
MiniBatchKMeans and NearestNeighbors, so they are composed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fewshot.config import SELECT_STRATEGIES as STRATEGIES
from fewshot.config import SelectConfig
from fewshot.errors import FewshotError

TYPICALITY_EPS = 1e-5  # added to the mean distance, as the authors' code
DELTA_STEP = 0.01  # ProbCover's radius grid on L2-normalised features (distances lie in [0, 2])
MINIBATCH_ABOVE = 50  # TypiClust's authors switch to mini-batch k-means above 50 clusters


@dataclass(frozen=True)
class Selection:
    """The chosen rows in pick order, with what each strategy knows about every pick."""

    indices: np.ndarray  # (B,) row indices into the features, in the order picked
    scores: np.ndarray  # (B,) typicality / newly covered images / distance to the nearest centre / NaN (random)
    clusters: np.ndarray  # (B,) TypiClust's cluster of each pick, -1 for the other strategies
    strategy: str
    details: dict[str, Any] = field(default_factory=dict)  # e.g. clusters, delta, coverage


def select(
    features: np.ndarray,
    budget: int,
    strategy: str = "typiclust",
    seed: int = 0,
    exclude: np.ndarray | None = None,
    n_classes: int | None = None,
    cfg: SelectConfig | None = None,
) -> Selection:
    """Choose ``budget`` rows of ``features`` (N, D) to label, by ``strategy``, seeded by ``seed``.

    ``exclude`` (bool mask or indices) marks rows that are already labelled: they are never picked, and they count
    as covering their surroundings (TypiClust's covered clusters, ProbCover's covered balls, k-centre's centres).
    ``n_classes`` (default ``cfg.classes``) is ProbCover's number of k-means clusters for choosing delta (the paper
    uses the class count); it is needed unless ``cfg.probcover_delta`` is given. ``cfg`` holds the strategies'
    hyperparameters (:class:`fewshot.config.SelectConfig`; its ``strategy``, ``budget`` and ``seed`` are not read).
    """
    from sklearn.preprocessing import normalize

    cfg = cfg or SelectConfig()
    n_classes = n_classes if n_classes is not None else cfg.classes
    if strategy not in STRATEGIES:
        raise FewshotError(f"unknown selection strategy '{strategy}'; choose from {', '.join(STRATEGIES)}")
    X = normalize(np.asarray(features, dtype=np.float32))  # (N, D) unit rows
    labelled = np.zeros(len(X), dtype=bool)
    if exclude is not None:
        exclude = np.asarray(exclude)
        labelled[exclude if exclude.dtype != bool else np.flatnonzero(exclude)] = True
    candidates = int((~labelled).sum())
    if budget < 1:
        raise FewshotError(f"the selection budget must be at least 1, got {budget}")
    if budget > candidates:
        raise FewshotError(
            f"asked to select {budget} images but only {candidates} are not yet labelled; lower --budget"
        )
    rng = np.random.default_rng(seed)
    if strategy == "random":
        picks = rng.choice(np.flatnonzero(~labelled), size=budget, replace=False)
        return Selection(picks, np.full(budget, np.nan), np.full(budget, -1), strategy)
    if strategy == "kcenter":
        return _kcenter(X, budget, labelled, rng)
    if strategy == "typiclust":
        return _typiclust(X, budget, labelled, seed, cfg.typiclust_neighbors, cfg.max_clusters, cfg.min_cluster_size)
    if cfg.probcover_delta is None and not n_classes:
        raise FewshotError(
            "probcover picks its ball radius from k-means with as many clusters as classes: give the number of "
            "classes (--classes N) or a radius (--set select.probcover_delta=0.5)"
        )
    return _probcover(X, budget, labelled, seed, rng, n_classes or 0, cfg.probcover_alpha, cfg.probcover_delta)


# ---------------------------------------------------------------------------------------------- TypiClust


def kmeans_labels(X: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Cluster index of every row: k-means up to 50 clusters, mini-batch k-means above (as TypiClust's code)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    model: KMeans | MiniBatchKMeans
    if n_clusters <= MINIBATCH_ABOVE:
        model = KMeans(n_clusters=n_clusters, n_init="auto", random_state=seed)
    else:
        model = MiniBatchKMeans(n_clusters=n_clusters, batch_size=5000, n_init="auto", random_state=seed)
    with threadpool_limits(1, user_api="blas"):  # small matrices: one BLAS thread is faster on a busy machine
        return model.fit_predict(X).astype(np.int64)  # (N,)


def typicality(X: np.ndarray, neighbors: int) -> np.ndarray:
    """1 / (mean Euclidean distance to the ``neighbors`` nearest other rows + eps), per row of X (n, D)."""
    from sklearn.neighbors import NearestNeighbors

    if len(X) == 1 or neighbors < 1:
        return np.ones(len(X))
    dist, _ = NearestNeighbors(n_neighbors=neighbors + 1).fit(X).kneighbors(X)  # (n, K+1), column 0 is the row
    return 1.0 / (dist[:, 1:].mean(axis=1) + TYPICALITY_EPS)


def _typiclust(
    X: np.ndarray, budget: int, labelled: np.ndarray, seed: int, k: int, max_clusters: int, min_size: int
) -> Selection:
    n_clusters = min(int(labelled.sum()) + budget, max_clusters, len(X))
    cluster = kmeans_labels(X, n_clusters, seed)
    size = np.bincount(cluster, minlength=n_clusters)
    covered = np.bincount(cluster[labelled], minlength=n_clusters)
    ids = np.flatnonzero(size >= min_size)
    if len(ids) == 0:  # a tiny pool: every cluster is small, so none is an outlier
        ids = np.flatnonzero(size > 0)
    order = ids[np.lexsort((ids, -size[ids], covered[ids]))]  # fewest labelled, then largest, then lowest id
    free = ~labelled
    picks: list[int] = []
    scores: list[float] = []
    clusters: list[int] = []
    turn = 0
    while len(picks) < budget:
        c = order[turn % len(order)]
        turn += 1
        members = np.flatnonzero((cluster == c) & free)
        if len(members) == 0:
            if not any(((cluster == o) & free).any() for o in order):
                order = np.flatnonzero(np.bincount(cluster[free], minlength=n_clusters))  # the left-out clusters
            continue
        typ = typicality(X[members], min(k, len(members) // 2))
        best = int(np.argmax(typ))  # first of equals: deterministic
        picks.append(int(members[best]))
        scores.append(float(typ[best]))
        clusters.append(int(c))
        free[members[best]] = False
    details = {"clusters": n_clusters, "clusters_used": len(ids), "min_cluster_size": min_size}
    return Selection(np.array(picks), np.array(scores), np.array(clusters), "typiclust", details)


# ---------------------------------------------------------------------------------------------- ProbCover


def purity_radius(X: np.ndarray, pseudo: np.ndarray, alpha: float) -> tuple[float, float]:
    """ProbCover's delta: the largest radius on a 0.01 grid at which a share ``alpha`` of the balls hold only one
    pseudo-label; returns (delta, purity at delta). A ball around x is pure iff x's nearest row of another
    pseudo-label lies farther than delta."""
    from sklearn.neighbors import NearestNeighbors

    other = np.full(len(X), np.inf)  # (N,) distance to the nearest row of another cluster
    for c in np.unique(pseudo):
        inside = pseudo == c
        if inside.all():
            break
        dist, _ = NearestNeighbors(n_neighbors=1).fit(X[~inside]).kneighbors(X[inside])
        other[inside] = dist[:, 0]
    grid = DELTA_STEP * np.arange(1, round(2.0 / DELTA_STEP) + 1)  # (200,) radii 0.01 .. 2.00
    purity = (other[None, :] > grid[:, None]).mean(axis=1)  # (200,) falls as the radius grows
    ok = np.flatnonzero(purity >= alpha)
    i = int(ok[-1]) if len(ok) else 0
    return float(grid[i]), float(purity[i])


def _probcover(
    X: np.ndarray,
    budget: int,
    labelled: np.ndarray,
    seed: int,
    rng: np.random.Generator,
    n_classes: int,
    alpha: float,
    delta: float | None,
) -> Selection:
    from sklearn.neighbors import radius_neighbors_graph

    details: dict[str, Any] = {}
    if delta is None:
        k = max(2, min(n_classes, len(X)))
        delta, purity = purity_radius(X, kmeans_labels(X, k, seed), alpha)
        details.update(purity=purity, purity_clusters=k)
    if delta <= 0:
        raise FewshotError(f"select.probcover_delta must be positive, got {delta}")
    graph = radius_neighbors_graph(X, delta, mode="connectivity", include_self=True).tocsr()  # (N, N) symmetric
    graph.data = graph.data.astype(np.int32)
    uncovered = np.ones(len(X), dtype=bool)
    if labelled.any():
        uncovered[graph[np.flatnonzero(labelled)].indices] = False  # balls of labelled images are covered already
    degree = graph @ uncovered.astype(np.int32)  # (N,) uncovered images in each ball
    free = ~labelled
    picks: list[int] = []
    scores: list[float] = []
    for _ in range(budget):
        gain = np.where(free, degree, -1)
        top = int(gain.max())
        # Ties (common: gains are counts) are broken at random, seeded: the first of equals would follow the
        # file order, which in a class-folder layout is the class order, and pick one class over and over once
        # the balls are small. Everything covered: a random image, as the paper's code.
        best = int(rng.choice(np.flatnonzero(gain == top) if top > 0 else np.flatnonzero(free)))
        picks.append(best)
        scores.append(float(max(top, 0)))
        free[best] = False
        newly = graph[best].indices[uncovered[graph[best].indices]]
        if len(newly):
            uncovered[newly] = False
            degree -= np.asarray(graph[newly].sum(axis=0)).ravel().astype(degree.dtype)  # symmetric graph
    details.update(delta=delta, coverage=float(1.0 - uncovered.mean()), mean_ball=float(graph.nnz / len(X)))
    return Selection(np.array(picks), np.array(scores), np.full(budget, -1), "probcover", details)


# ---------------------------------------------------------------------------------------------- k-centre


def _kcenter(X: np.ndarray, budget: int, labelled: np.ndarray, rng: np.random.Generator) -> Selection:
    from sklearn.metrics import pairwise_distances

    nearest = np.full(len(X), np.inf)  # (N,) distance to the nearest centre
    if labelled.any():
        nearest = pairwise_distances(X, X[labelled]).min(axis=1)
    free = ~labelled
    picks: list[int] = []
    scores: list[float] = []
    for _ in range(budget):
        if np.isinf(nearest).all():  # nothing labelled yet: the first centre is a seeded random image
            best = int(rng.choice(np.flatnonzero(free)))
        else:
            best = int(np.argmax(np.where(free, nearest, -1)))
        picks.append(best)
        scores.append(float(nearest[best]) if np.isfinite(nearest[best]) else np.nan)
        free[best] = False
        nearest = np.minimum(nearest, pairwise_distances(X, X[best : best + 1])[:, 0])
    return Selection(np.array(picks), np.array(scores), np.full(budget, -1), "kcenter")
