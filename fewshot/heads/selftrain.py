"""Self-training (Yarowsky 1995; scikit-learn's ``SelfTrainingClassifier``) of the ``logreg`` head on the pool.

The ``logreg`` head is first fitted on the support alone, which fixes C by its stratified CV (or ``one_shot_c``
with 1 shot), so the labels alone choose the regularisation. Then sklearn's ``SelfTrainingClassifier`` refits that
head with C fixed, adding at each of ``max_iter`` rounds, with its predicted class as label, every pool image whose
top probability exceeds ``threshold`` (``criterion="threshold"``) or the ``k_best`` most confident ones
(``criterion="k_best"``); sklearn's convention: pool rows carry -1. The result is a
logistic regression like ``logreg``'s: inductive, so ``predict`` scores new images without the pool.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
from numpy.typing import ArrayLike
from sklearn.semi_supervised import SelfTrainingClassifier

from fewshot.config import SelfTrainConfig
from fewshot.heads.io import Head
from fewshot.heads.logreg import LogRegHead


@dataclass(kw_only=True, eq=False, repr=False)
class SelfTrainHead(Head):
    """``logreg`` self-trained on the pool (sklearn's SelfTrainingClassifier).

    Parameters
    ----------
    criterion : ``threshold`` (adopt pool images above ``threshold`` confidence) or ``k_best`` per round.
    threshold, k_best, max_iter : of that criterion; ``max_iter`` rounds.
    c_grid, one_shot_c, cv_folds : how C is chosen on the support, as ``logreg``.

    Attributes
    ----------
    C_ : the C chosen on the support; ``logreg_``: the final head; ``pseudo_labelled_``: pool images adopted.
    """

    name: ClassVar[str] = "selftrain"
    uses_pool: ClassVar[bool] = True
    config: ClassVar[type] = SelfTrainConfig

    criterion: str = SelfTrainConfig.criterion
    threshold: float = SelfTrainConfig.threshold
    k_best: int = SelfTrainConfig.k_best
    max_iter: int = SelfTrainConfig.max_iter
    # how C is chosen on the support: logreg's hyperparameters, with its defaults, set as heads.selftrain.c_grid, ...
    c_grid: tuple[float, ...] = SelfTrainConfig.c_grid
    one_shot_c: float = SelfTrainConfig.one_shot_c
    cv_folds: int = SelfTrainConfig.cv_folds

    def fit(self, X: ArrayLike, y: ArrayLike) -> Self:
        X, y = self._validate_fit(X, y)  # y: (N,) int64, -1 for the pool
        labelled = y >= 0
        support = LogRegHead(c_grid=self.c_grid, one_shot_c=self.one_shot_c, cv_folds=self.cv_folds)
        support.fit(X[labelled], y[labelled])
        self.C_ = support.C_
        if labelled.all():  # no pool: self-training has nothing to add
            self.logreg_, self.pseudo_labelled_ = support, 0
            return self
        fixed = LogRegHead(c_grid=(self.C_,), one_shot_c=self.C_, cv_folds=self.cv_folds)
        model = SelfTrainingClassifier(
            fixed,
            criterion=self.criterion,
            threshold=self.threshold,
            k_best=min(self.k_best, int((~labelled).sum())),
            max_iter=self.max_iter,
        ).fit(X, y)
        self.logreg_ = model.estimator_
        self.pseudo_labelled_ = int(((model.labeled_iter_ > 0) & ~labelled).sum())
        return self

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        return self.logreg_.predict_proba(self._validate_predict(X))  # (Q, C)

    def predict(self, X: ArrayLike) -> np.ndarray:
        return self.logreg_.predict(self._validate_predict(X))  # (Q,)

    def to_state(self) -> dict[str, np.ndarray]:
        return {**self.logreg_.to_state(), "pseudo_labelled": np.asarray(self.pseudo_labelled_)}

    @classmethod
    def from_state(cls, params: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Self:
        head = cls(**params)
        head.logreg_ = LogRegHead.from_state({"c_grid": head.c_grid, "one_shot_c": head.one_shot_c}, state)
        head.classes_ = head.logreg_.classes_
        head.n_features_in_ = head.logreg_.n_features_in_
        head.C_ = head.logreg_.C_
        head.pseudo_labelled_ = int(state["pseudo_labelled"])
        return head
