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
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import normalize
from sklearn.semi_supervised import LabelSpreading
from sklearn.utils.validation import validate_data
from threadpoolctl import threadpool_limits

from fewshot.config import SpreadConfig
from fewshot.errors import FewshotError
from fewshot.heads.io import Head, check_pool_labels


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

    def __init__(
        self,
        *,
        k: int = SpreadConfig.k,
        alpha: float = SpreadConfig.alpha,
        max_iter: int = SpreadConfig.max_iter,
        tol: float = SpreadConfig.tol,
    ) -> None:
        self.k = k
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol

    def check_params(self) -> None:
        """One-line error for hyperparameters LabelSpreading would reject (called by fit and, early, by evaluate)."""
        if self.k < 1 or not 0 < self.alpha < 1 or self.max_iter < 1 or self.tol < 0:
            raise FewshotError(
                f"heads.spread needs k >= 1, 0 < alpha < 1, max_iter >= 1 and tol >= 0 (got k={self.k}, "
                f"alpha={self.alpha}, max_iter={self.max_iter}, tol={self.tol}); fix the recipe or --set value"
            )

    def fit(self, X: Any, y: Any) -> Self:
        self.check_params()
        X, y = validate_data(self, X, y, dtype=np.float32, reset=True)
        self.classes_ = check_pool_labels(self.name, y)
        self.pool_ = X  # (N, D) support rows and pool rows
        self.pool_labels_ = np.asarray(y, dtype=np.int64)  # (N,) -1 for the pool
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

    def predict_proba(self, X: Any) -> np.ndarray:
        return self.spread(self._validate_predict(X))  # (Q, C)

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]  # (Q,)

    def to_state(self) -> dict[str, np.ndarray]:
        return {"pool": self.pool_, "pool_labels": self.pool_labels_}

    @classmethod
    def from_state(cls, params: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Self:
        # Fitting only keeps the support and pool, so refitting on them rebuilds the identical head.
        return cls(**params).fit(state["pool"], state["pool_labels"])
