"""L2-normalised features + multinomial logistic regression, C picked by cross-validation inside the support.

The low-shot protocol of MSN (Assran et al. 2022: logistic regression on L2-normalised frozen features) with
DINOv2's C search (Oquab et al. 2023), composed from sklearn: ``Pipeline(Normalizer(), LogisticRegressionCV)``.
With at least 2 shots in every class, C is chosen from ``c_grid`` by stratified k-fold accuracy on the support
(folds = min(cv_folds, smallest class count)); ``LogisticRegressionCV`` warm-starts lbfgs along the C path,
which is what keeps 40 episodes x 6 Cs x up to 5 folds to a few seconds. With 1 shot in any class there is
nothing to validate on, so ``one_shot_c`` is used. The chosen C is ``C_``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
from numpy.typing import ArrayLike
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer
from threadpoolctl import threadpool_limits

from fewshot.config import LogRegConfig
from fewshot.heads.io import Head

TOL = 1e-4  # lbfgs gradient tolerance (sklearn's default)
# One BLAS thread: the matrices are tiny (support x 384), so thread hand-offs cost more than the maths; on a
# busy 2-core machine multi-threaded OpenBLAS made the CV fits 5-10x slower.
BLAS_THREADS = 1


@dataclass(kw_only=True, eq=False, repr=False)
class LogRegHead(Head):
    """Logistic regression on L2-normalised features.

    Parameters
    ----------
    c_grid : inverse regularisation strengths tried by stratified cross-validation inside the support (≥2 shots).
    one_shot_c : C with one image per class, where there is nothing to cross-validate.
    cv_folds : folds of that cross-validation (fewer when a class has fewer images).
    max_iter : L-BFGS iterations.

    Attributes
    ----------
    C_ : the C of the final fit; ``model_``: sklearn's Normalizer + LogisticRegression pipeline.
    """

    name: ClassVar[str] = "logreg"
    config: ClassVar[type] = LogRegConfig

    c_grid: tuple[float, ...] = LogRegConfig.c_grid
    one_shot_c: float = LogRegConfig.one_shot_c
    cv_folds: int = LogRegConfig.cv_folds
    max_iter: int = LogRegConfig.max_iter

    def fit(self, X: ArrayLike, y: ArrayLike) -> Self:
        X, y = self._validate_fit(X, y)
        folds = min(self.cv_folds, int(np.bincount(np.searchsorted(self.classes_, y)).min()))
        classifier: LogisticRegression
        if folds >= 2 and len(self.c_grid) > 1:
            classifier = LogisticRegressionCV(
                Cs=sorted(self.c_grid),  # ascending: each fit warm-starts from the more regularised one
                cv=StratifiedKFold(n_splits=folds),  # no shuffle: deterministic, support order is already seeded
                l1_ratios=(0.0,),  # plain L2 penalty
                scoring="accuracy",
                solver="lbfgs",
                tol=TOL,
                max_iter=self.max_iter,
                use_legacy_attributes=False,
            )
        else:
            c = self.c_grid[0] if folds >= 2 else self.one_shot_c
            classifier = LogisticRegression(C=c, solver="lbfgs", tol=TOL, max_iter=self.max_iter)
        self.model_ = Pipeline([("normalize", Normalizer()), ("logreg", classifier)])
        with warnings.catch_warnings(), threadpool_limits(BLAS_THREADS, user_api="blas"):
            # Few-shot supports are linearly separable, so at large C the optimum is far away and lbfgs may stop
            # at max_iter; that C then rarely wins the CV, and the warning would repeat for every fold and episode.
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model_.fit(X, y)
        # lbfgs leaves coef_ column-major; a C-ordered copy makes a saved-and-loaded head (safetensors stores
        # C order) run the same BLAS path, so its probabilities match to the last bit.
        classifier.coef_ = np.ascontiguousarray(classifier.coef_)
        self.C_ = float(classifier.C_ if isinstance(classifier, LogisticRegressionCV) else classifier.C)
        return self

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        X = self._validate_predict(X)
        with threadpool_limits(BLAS_THREADS, user_api="blas"):
            return self.model_.predict_proba(X)  # (Q, C)

    def predict(self, X: ArrayLike) -> np.ndarray:
        X = self._validate_predict(X)
        with threadpool_limits(BLAS_THREADS, user_api="blas"):
            return self.model_.predict(X)  # (Q,)

    def to_state(self) -> dict[str, np.ndarray]:
        classifier = self.model_[-1]
        return {
            "coef": classifier.coef_,
            "intercept": classifier.intercept_,
            "classes": self.classes_,
            "C": np.asarray(self.C_),
        }

    @classmethod
    def from_state(cls, params: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Self:
        head = cls(**params)
        coef = np.asarray(state["coef"])  # (C, D), or (1, D) for 2 classes
        classifier = LogisticRegression(C=float(state["C"]), solver="lbfgs", tol=TOL, max_iter=head.max_iter)
        # A fitted LogisticRegression is fully described by these attributes; setting them restores it exactly.
        classifier.coef_ = coef
        classifier.intercept_ = np.asarray(state["intercept"])
        classifier.classes_ = np.asarray(state["classes"])
        classifier.n_features_in_ = coef.shape[1]
        normalizer = Normalizer().fit(np.zeros((1, coef.shape[1]), dtype=np.float32))  # stateless; fit sets shape
        head.model_ = Pipeline([("normalize", normalizer), ("logreg", classifier)])
        head.classes_ = classifier.classes_
        head.n_features_in_ = coef.shape[1]
        head.C_ = float(state["C"])
        return head
