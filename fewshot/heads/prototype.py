"""Nearest class mean of L2-normalised features (prototypical networks, Snell et al. 2017; SimpleShot, Wang et al.
2019): the mean of each class's L2-normalised support features.

Choice: the class means are re-normalised to unit length, so the prediction is the class whose mean *direction*
has the highest cosine similarity with the feature, and ``predict`` is the argmax of ``predict_proba`` =
softmax(cos / temperature), one formula for both. Without re-normalising (NearestCentroid's own Euclidean rule,
as SimpleShot), a class whose support is spread out (shorter mean vector) is penalised for its spread rather
than judged by its direction; cosine to the unit mean is also what the scores report. The means are plain numpy:
sklearn's NearestCentroid would add a within-class variance estimate this head never uses, which fails on
supports where every feature is constant (e.g. one repeated image).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import softmax
from sklearn.preprocessing import normalize

from fewshot.config import PrototypeConfig
from fewshot.heads.io import Head


@dataclass(kw_only=True, eq=False, repr=False)
class PrototypeHead(Head):
    """Cosine nearest class mean (Snell et al. 2017).

    Parameters
    ----------
    temperature : softmax temperature over the cosine similarities; changes the scores, never the label.

    Attributes
    ----------
    centroids_ : (C, D) unit-length class means, one row per ``classes_``.
    """

    name: ClassVar[str] = "prototype"
    config: ClassVar[type] = PrototypeConfig

    temperature: float = PrototypeConfig.temperature

    def fit(self, X: ArrayLike, y: ArrayLike) -> Self:
        X, y = self._validate_fit(X, y)
        unit = normalize(X)  # (N, D)
        means = np.stack([unit[y == c].mean(axis=0) for c in self.classes_])  # (C, D), rows ordered as classes_
        self.centroids_ = normalize(means)  # unit class means
        return self

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """Cosine similarity of each feature to each class mean; ``predict`` (Head's) is its argmax."""
        return normalize(self._validate_predict(X)) @ self.centroids_.T  # (Q, C)

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        return softmax(self.decision_function(X) / self.temperature, axis=1)  # (Q, C)

    def to_state(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids_, "classes": self.classes_}

    @classmethod
    def from_state(cls, params: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Self:
        head = cls(**params)
        head.centroids_ = np.asarray(state["centroids"])
        head.classes_ = np.asarray(state["classes"])
        head.n_features_in_ = head.centroids_.shape[1]
        return head
