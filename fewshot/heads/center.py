"""Feature centring for any head: subtract the unlabeled pool's mean, then L2-normalise ("CL2N").

SimpleShot (Wang et al. 2019) showed that centring frozen features on a mean of unlabeled/base features and
L2-normalising them lifts nearest-neighbour few-shot accuracy by several points; transductive few-shot methods
centre on the query/pool mean in the same way. ``CenteredHead(head)`` learns the mean of the pool rows it is given
(sklearn's convention: label -1; with no pool rows, the support's mean), transforms every row the same way, and
hands the result to ``head``: only the labelled rows for an inductive head, all rows for a pool head. The mean is
saved with the head, so ``predict`` centres new images on the same pool mean. Written ``HEAD+center``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import clone
from sklearn.preprocessing import normalize
from sklearn.utils.validation import validate_data

from fewshot.heads.io import Head, check_labels

SUFFIX = "+center"


@dataclass(eq=False, repr=False)
class CenteredHead(Head):
    """``head`` on L2-normalised, pool-centred features; ``mean_`` (D,) is the pool mean.

    ``head`` is its only hyperparameter (positional: ``CenteredHead(LogRegHead())``); the wrapped head checks its
    own hyperparameters when it is fitted.
    """

    name: ClassVar[str] = "center"
    uses_pool: ClassVar[bool] = True

    head: Head | None = None

    def fit(self, X: ArrayLike, y: ArrayLike) -> Self:
        if self.head is None:
            raise TypeError("CenteredHead needs a head to wrap, e.g. CenteredHead(LogRegHead())")
        features, given = validate_data(self, X, y, dtype=np.float32, reset=True)  # (N, D), (N,)
        labels, _ = check_labels(f"{self.head.name}{SUFFIX}", given, pool=True)  # (N,) int64, -1 for the pool
        pool = labels < 0
        self.mean_ = features[pool].mean(axis=0) if pool.any() else features.mean(axis=0)  # (D,)
        Z = self._transform(features)  # (N, D)
        inner = clone(self.head)
        self.head_ = inner.fit(Z, labels) if inner.uses_pool else inner.fit(Z[~pool], labels[~pool])
        self.classes_ = self.head_.classes_
        return self

    def _transform(self, X: np.ndarray) -> np.ndarray:
        return normalize(X - self.mean_).astype(np.float32)  # (N, D)

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        return self.head_.predict_proba(self._transform(self._validate_predict(X)))  # (Q, C)

    def predict(self, X: ArrayLike) -> np.ndarray:
        return self.head_.predict(self._transform(self._validate_predict(X)))  # (Q,)

    def to_state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, **{f"head.{k}": v for k, v in self.head_.to_state().items()}}

    @classmethod
    def from_state(cls, params: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Self:
        inner = params["head"]  # rebuilt (unfitted) by fewshot.heads.io from its name and hyperparameters
        head = cls(head=inner)
        inner_state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        head.head_ = type(inner).from_state(inner.get_params(deep=False), inner_state)
        head.mean_ = np.asarray(state["mean"], dtype=np.float32)
        head.classes_ = head.head_.classes_
        head.n_features_in_ = len(head.mean_)
        return head
