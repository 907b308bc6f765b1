"""Label spreading on a k-NN graph of the support, the unlabeled pool and the images being scored (transductive).

Zhou et al., "Learning with Local and Global Consistency", NeurIPS 2004: labels spread along a normalised graph,
F <- alpha S F + (1 - alpha) Y, until they settle; each image takes its strongest class. Composed from
scikit-learn's ``LabelSpreading(kernel="knn")`` on L2-normalised features (so the Euclidean k-NN graph is the
cosine one), with sklearn's convention that unlabeled rows carry the label -1.

Transductive by design: ``fit`` keeps the support and the pool; ``predict_proba(X)`` builds the graph over
support + pool + X and reads X's rows, so the images scored together help each other, and a saved head scores
new images by spreading again over its saved pool (``predict`` refits; nothing is approximated). Scores of one
image therefore depend on the batch it is scored with: score a batch from one distribution.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Self

import numpy as np
from numpy.typing import ArrayLike
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import normalize
from sklearn.semi_supervised import LabelSpreading
from threadpoolctl import threadpool_limits

from fewshot.config import SpreadConfig
from fewshot.heads.io import Head


@dataclass(kw_only=True, eq=False, repr=False)
class SpreadHead(Head):
    """Label spreading (Zhou et al. 2004) over support + pool + scored images: transductive.

    Parameters
    ----------
    k : neighbours per image in the k-NN graph.
    alpha : weight of the neighbours against an image's own label.
    max_iter, tol : of sklearn's LabelSpreading.

    Attributes
    ----------
    pool_ : (N, D) support and pool rows; ``pool_labels_`` (N,): their labels, -1 for the pool. ``predict`` spreads
    again over them and the new images.
    """

    name: ClassVar[str] = "spread"
    uses_pool: ClassVar[bool] = True
    config: ClassVar[type] = SpreadConfig
    data_keys: ClassVar[tuple[str, str]] = ("pool", "pool_labels")  # fitting only keeps the support and pool

    k: int = SpreadConfig.k
    alpha: float = SpreadConfig.alpha
    max_iter: int = SpreadConfig.max_iter
    tol: float = SpreadConfig.tol

    def fit(self, X: ArrayLike, y: ArrayLike) -> Self:
        X, y = self._validate_fit(X, y)
        self.pool_ = X  # (N, D) support rows and pool rows
        self.pool_labels_ = y  # (N,) -1 for the pool
        return self

    def spread(self, X: np.ndarray) -> np.ndarray:
        """Label distributions of the rows of X (Q, D) after spreading over support + pool + X: (Q, C)."""
        stacked = normalize(np.concatenate([self.pool_, X]))  # (N + Q, D)
        labels = np.concatenate([self.pool_labels_, np.full(len(X), -1, dtype=np.int64)])
        model = LabelSpreading(
            kernel="knn",
            n_neighbors=min(self.k, len(stacked) - 1),
            alpha=self.alpha,
            max_iter=self.max_iter,
            tol=self.tol,
        )
        with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)  # the distributions are usable; ranks settle first
            model.fit(stacked, labels)
        return model.label_distributions_[len(self.pool_) :]  # (Q, C), columns ordered as classes_

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        return self.spread(self._validate_predict(X))  # (Q, C); predict (Head's) is its argmax

    def to_state(self) -> dict[str, np.ndarray]:
        return {"pool": self.pool_, "pool_labels": self.pool_labels_}
