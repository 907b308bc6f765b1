"""Nearest class mean of L2-normalised features (prototypical networks, Snell et al. 2017; SimpleShot, Wang et al.
2019). The class means of the L2-normalised support come from sklearn's ``Pipeline(Normalizer(),
NearestCentroid())``.

Choice: the class means are re-normalised to unit length, so the prediction is the class whose mean *direction*
has the highest cosine similarity with the feature, and ``predict`` is the argmax of ``predict_proba`` =
softmax(cos / temperature), one formula for both. Without re-normalising (NearestCentroid's own Euclidean rule,
as SimpleShot), a class whose support is spread out (shorter mean vector) is penalised for its spread rather
than judged by its direction; cosine to the unit mean is also what the scores report.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import numpy as np
from scipy.special import softmax
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, normalize

from fewshot.heads.io import Head


class PrototypeHead(Head):
    """Cosine nearest class mean; ``centroids_`` are the unit-length class means, one row per ``classes_``."""

    name: ClassVar[str] = "prototype"

    def __init__(self, temperature: float = 0.1) -> None:
        self.temperature = temperature

    def fit(self, X: Any, y: Any) -> Self:
        X, y = self._validate_fit(X, y)
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            # NearestCentroid also estimates a within-class spread (unused here): a 0/0 with one shot per class,
            # and a warning when a feature is constant within a class (e.g. a blank image border in pixels).
            warnings.simplefilter("ignore", UserWarning)
            means = Pipeline([("normalize", Normalizer()), ("centroid", NearestCentroid())]).fit(X, y)[-1].centroids_
        self.centroids_ = normalize(means)  # (C, D) unit class means, rows ordered as classes_
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Cosine similarity of each feature to each class mean."""
        return normalize(self._validate_predict(X)) @ self.centroids_.T  # (Q, C)

    def predict_proba(self, X: Any) -> np.ndarray:
        return softmax(self.decision_function(X) / self.temperature, axis=1)  # (Q, C)

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]  # (Q,)

    def to_state(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids_, "classes": self.classes_}

    @classmethod
    def from_state(cls, params: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Self:
        head = cls(**params)
        head.centroids_ = np.asarray(state["centroids"])
        head.classes_ = np.asarray(state["classes"])
        head.n_features_in_ = head.centroids_.shape[1]
        return head
