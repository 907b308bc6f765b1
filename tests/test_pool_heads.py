"""Heads that use the unlabeled pool (spread, selftrain, HEAD+center): each against an independent reference,
and saved heads that reload and predict the same labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, normalize
from sklearn.semi_supervised import LabelSpreading, SelfTrainingClassifier

from fewshot.config import HeadsConfig, SelfTrainConfig
from fewshot.errors import FewshotError
from fewshot.heads import CenteredHead, LogRegHead, PrototypeHead, SpreadHead, load_head, make_head, save_head


def semi(seed: int = 0, classes: int = 4, shots: int = 2, pool: int = 30, queries: int = 15, dim: int = 12):
    """(X, y) with ``shots`` labelled rows per class then ``pool`` rows per class labelled -1, and (Q, y_Q)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2.0 + 1.5  # off-centre: centring has something to remove

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(classes), n)
        return (centres[y] + rng.normal(size=(len(y), dim))).astype(np.float32), y

    xs, ys = draw(shots)
    xp, _ = draw(pool)
    xq, yq = draw(queries)
    X = np.concatenate([xs, xp])
    y = np.concatenate([ys, np.full(len(xp), -1)])
    return X, y, xq, yq


def zhou_closed_form(Z: np.ndarray, y: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """Label spreading written out (Zhou et al. 2004) on sklearn's k-NN graph: each row links to its k nearest
    rows (itself included, as kneighbors_graph does), degrees are column sums without self-loops (scipy's
    normalised Laplacian, with 1 for a degree of 0), S = D^-1/2 W D^-1/2 with a zero diagonal,
    F* = (1 - alpha) (I - alpha S)^-1 Y."""
    n = len(Z)
    dist = np.linalg.norm(Z[:, None] - Z[None], axis=2)  # (n, n)
    W = np.zeros((n, n))
    for i in range(n):
        W[i, np.argsort(dist[i], kind="stable")[:k]] = 1.0
    np.fill_diagonal(W, 0.0)
    d = W.sum(axis=0)
    root = np.where(d > 0, np.sqrt(d), 1.0)  # scipy treats an image nobody links to as degree 1
    S = W / np.outer(root, root)
    classes = np.unique(y[y >= 0])
    Y = (y[:, None] == classes[None]).astype(np.float64)  # (n, C), zero rows for the pool
    F = (1 - alpha) * np.linalg.solve(np.eye(n) - alpha * S, Y)
    return F / F.sum(axis=1, keepdims=True)


def test_spread_matches_label_spreading_written_out() -> None:
    X, y, xq, _ = semi()
    head = SpreadHead(k=7, alpha=0.5, max_iter=5000, tol=1e-12).fit(X, y)
    proba = head.predict_proba(xq)
    stacked = normalize(np.concatenate([X, xq]))
    labels = np.concatenate([y, np.full(len(xq), -1)])
    expected = zhou_closed_form(stacked, labels, k=7, alpha=0.5)[len(X) :]
    np.testing.assert_allclose(proba, expected, atol=1e-6)
    np.testing.assert_array_equal(head.predict(xq), expected.argmax(axis=1))


def test_spread_is_sklearn_label_spreading_on_the_same_graph() -> None:
    X, y, xq, yq = semi(seed=1)
    head = make_head("spread", HeadsConfig())
    proba = head.fit(X, y).predict_proba(xq)
    cfg = HeadsConfig().spread
    reference = LabelSpreading(kernel="knn", n_neighbors=cfg.k, alpha=cfg.alpha, max_iter=cfg.max_iter, tol=cfg.tol)
    reference.fit(normalize(np.concatenate([X, xq])), np.concatenate([y, np.full(len(xq), -1)]))
    np.testing.assert_allclose(proba, reference.label_distributions_[len(X) :], rtol=1e-6, atol=1e-9)
    assert np.mean(head.predict(xq) == yq) > 0.9  # separable blobs: spreading labels them


def test_selftrain_is_sklearn_self_training_with_the_supports_c() -> None:
    X, y, xq, _ = semi(seed=2, shots=1)  # 1 shot: logreg's fixed C = 10, confident enough to adopt pool images
    cfg = HeadsConfig(selftrain=SelfTrainConfig(threshold=0.75))
    head = make_head("selftrain", cfg).fit(X, y)
    labelled = y >= 0
    c = LogRegHead().fit(X[labelled], y[labelled]).C_  # C chosen on the support alone
    assert c == head.C_
    base = make_pipeline(Normalizer(), LogisticRegression(C=c, tol=1e-4, max_iter=1000))
    reference = SelfTrainingClassifier(base, threshold=0.75, max_iter=cfg.selftrain.max_iter).fit(X, y)
    np.testing.assert_array_equal(head.predict(xq), reference.predict(xq))
    np.testing.assert_allclose(head.predict_proba(xq), reference.predict_proba(xq), rtol=1e-5, atol=1e-7)
    assert head.pseudo_labelled_ == int(((reference.labeled_iter_ > 0) & ~labelled).sum()) > 0


def test_center_subtracts_the_pool_mean_then_normalises() -> None:
    X, y, xq, _ = semi(seed=3)
    head = make_head("prototype+center", HeadsConfig()).fit(X, y)
    assert isinstance(head, CenteredHead)
    mean = X[y < 0].mean(axis=0)
    np.testing.assert_allclose(head.mean_, mean, rtol=1e-6)
    labelled = y >= 0
    reference = PrototypeHead().fit(normalize(X[labelled] - mean), y[labelled])
    np.testing.assert_array_equal(head.predict(xq), reference.predict(normalize(xq - mean)))
    np.testing.assert_allclose(head.predict_proba(xq), reference.predict_proba(normalize(xq - mean)), atol=1e-6)


@pytest.mark.parametrize("name", ["spread", "selftrain", "logreg+center", "knn+center", "spread+center"])
def test_saved_pool_heads_reload_and_predict_the_same(name: str, tmp_path: Path) -> None:
    X, y, xq, _ = semi(seed=4)
    head = make_head(name, HeadsConfig()).fit(X, y)
    save_head(head, tmp_path, {"note": "test"})
    meta = json.loads((tmp_path / "head.json").read_text())
    if name.endswith("+center"):
        assert meta["head"] == "center" and meta["params"]["head"]["head"] == name.removesuffix("+center")
    again, info = load_head(tmp_path)
    assert info == {"note": "test"}
    np.testing.assert_array_equal(again.predict(xq), head.predict(xq))
    np.testing.assert_allclose(again.predict_proba(xq), head.predict_proba(xq), rtol=1e-6, atol=1e-9)


def test_pool_heads_need_two_labelled_classes() -> None:
    X, y, _, _ = semi(classes=2)
    y = np.where(y == 1, -1, y)  # only class 0 is labelled
    for name in ("spread", "selftrain", "logreg+center"):
        with pytest.raises(FewshotError, match="at least 2 classes"):
            make_head(name, HeadsConfig()).fit(X, y)


def test_unknown_head_suffix_is_a_one_line_error() -> None:
    with pytest.raises(FewshotError, match=r"unknown head 'logreg\+whiten'.*\+center"):
        make_head("logreg+whiten", HeadsConfig())
