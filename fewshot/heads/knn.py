"""Weighted k-NN on cosine similarity, as DINO's ``eval_knn`` (Caron et al. 2021; Wu et al. 2018).

Each of the k most similar support features votes ``exp(sim / T)`` for its class; scores are the votes summed
per class (normalised to sum to 1 by ``predict_proba``, which keeps DINO's argmax). Composed from sklearn's
brute-force ``KNeighborsClassifier`` with the cosine metric: distance ``d = 1 - sim``, so the vote weight is
``exp((1 - d) / T)``. sklearn computes the distances in chunks (``working_memory``), so 5,000 queries against
10,000 support rows stay within memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Self

import numpy as np
from numpy.typing import ArrayLike
from sklearn.neighbors import KNeighborsClassifier

from fewshot.config import KNNConfig
from fewshot.heads.io import Head


def dino_weights(distances: np.ndarray, temperature: float) -> np.ndarray:
    """Vote weight ``exp(sim / T)`` from cosine distances ``d = 1 - sim``."""
    return np.exp((1.0 - distances) / temperature)  # (Q, k)


@dataclass(kw_only=True, eq=False, repr=False)
class KNNHead(Head):
    """DINO's weighted k-NN on cosine similarity.

    Parameters
    ----------
    k : neighbours that vote, capped at the support size.
    temperature : T of the vote weight ``exp(sim / T)``.

    Attributes
    ----------
    n_neighbors_ : the k used; ``support_`` (N, D), ``support_labels_`` (N,): the support, which is k-NN's state.
    """

    name: ClassVar[str] = "knn"
    config: ClassVar[type] = KNNConfig
    data_keys: ClassVar[tuple[str, str]] = ("support", "support_labels")  # k-NN's learned state is its support

    k: int = KNNConfig.k
    temperature: float = KNNConfig.temperature

    def fit(self, X: ArrayLike, y: ArrayLike) -> Self:
        X, y = self._validate_fit(X, y)
        self.n_neighbors_ = min(self.k, len(X))
        self.support_ = X  # (N, D) kept for saving: k-NN's learned state is the support set itself
        self.support_labels_ = y  # (N,)
        self.model_ = KNeighborsClassifier(
            n_neighbors=self.n_neighbors_,
            weights=partial(dino_weights, temperature=self.temperature),
            algorithm="brute",
            metric="cosine",
        ).fit(X, y)
        return self

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        # predict (Head's) is the argmax of these normalised votes: sklearn's own predict takes the argmax of the
        # same votes, summed in another order, so on a near-tie it could disagree with the scores reported here
        return self.model_.predict_proba(self._validate_predict(X))  # (Q, C)

    def to_state(self) -> dict[str, np.ndarray]:
        return {"support": self.support_, "support_labels": self.support_labels_}
