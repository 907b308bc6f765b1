"""Few-shot heads: each against an independent reference, plus registry, persistence and input errors."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

from fewshot.config import HeadsConfig, KNNConfig, LinearConfig
from fewshot.config_rules import ConfigValueError
from fewshot.errors import FewshotError
from fewshot.heads import (
    HEADS,
    CenteredHead,
    KNNHead,
    LinearHead,
    LogRegHead,
    PrototypeHead,
    SelfTrainHead,
    SpreadHead,
    load_head,
    make_head,
    save_head,
)


def blobs(seed: int, classes: int, shots: int, dim: int = 16, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``shots`` noisy rows around each of ``classes`` random centres; float32 features, int64 labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = np.repeat(np.arange(classes), shots)
    X = centres[y] + spread * rng.normal(size=(len(y), dim))
    return X.astype(np.float32), y.astype(np.int64)


def unit(X: np.ndarray) -> np.ndarray:
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def dino_vote(support: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int, T: float) -> np.ndarray:
    """DINO's eval_knn written out: top-k cosine neighbours each add exp(sim / T) to their class."""
    sim = unit(queries.astype(np.float64)) @ unit(support.astype(np.float64)).T  # (Q, N)
    top = np.argsort(-sim, axis=1)[:, :k]  # (Q, k)
    votes = np.zeros((len(queries), labels.max() + 1))
    for q in range(len(queries)):
        np.add.at(votes[q], labels[top[q]], np.exp(sim[q, top[q]] / T))
    return votes


# ---------------------------------------------------------------------------------------------- knn


def test_knn_matches_the_dino_vote() -> None:
    X, y = blobs(0, classes=5, shots=12, spread=2.0)
    queries, _ = blobs(1, classes=5, shots=40, spread=2.0)
    head = KNNHead(k=7, temperature=0.07).fit(X, y)
    votes = dino_vote(X, y, queries, k=7, T=0.07)
    np.testing.assert_array_equal(head.predict(queries), votes.argmax(1))
    np.testing.assert_allclose(head.predict_proba(queries), votes / votes.sum(1, keepdims=True), rtol=1e-4, atol=1e-7)


def test_knn_caps_k_at_the_support_size() -> None:
    X, y = blobs(2, classes=3, shots=2)
    queries, _ = blobs(3, classes=3, shots=5)
    head = KNNHead(k=20, temperature=0.1).fit(X, y)
    assert head.n_neighbors_ == 6
    assert head.k == 20  # hyperparameters stay as given (sklearn convention)
    votes = dino_vote(X, y, queries, k=6, T=0.1)
    np.testing.assert_allclose(head.predict_proba(queries), votes / votes.sum(1, keepdims=True), rtol=1e-4)


def test_knn_predict_is_sklearns_vote_even_on_ties() -> None:
    """predict is the argmax of predict_proba (Head's); sklearn's KNeighborsClassifier.predict (weighted_mode) gives
    the same labels, exact ties included: both take the first (smallest) tied class."""
    X, y = blobs(15, classes=4, shots=6, spread=2.0)
    queries, _ = blobs(16, classes=4, shots=30, spread=2.0)
    head = KNNHead(k=9).fit(X, y)
    np.testing.assert_array_equal(head.predict(queries), head.model_.predict(queries))
    rows, _ = blobs(17, classes=2, shots=1)
    tied = np.repeat(rows, 3, axis=0)  # (6, D): each row three times, labelled 2, 1, 0: every vote ties 3 ways
    head = KNNHead(k=6).fit(tied, np.tile([2, 1, 0], 2))
    proba = head.predict_proba(queries)
    np.testing.assert_array_equal(proba, np.full_like(proba, 1 / 3))
    np.testing.assert_array_equal(head.predict(queries), np.zeros(len(queries)))
    np.testing.assert_array_equal(head.predict(queries), head.model_.predict(queries))


# ---------------------------------------------------------------------------------------------- logreg


def test_logreg_picks_c_by_stratified_cv_with_two_or_more_shots() -> None:
    X, y = blobs(0, classes=4, shots=4, spread=1 / 0.6)
    grid = (0.01, 0.1, 1.0, 10.0, 100.0)
    head = LogRegHead(c_grid=grid, cv_folds=3).fit(X, y)
    reference = GridSearchCV(
        make_pipeline(Normalizer(), LogisticRegression(max_iter=1000)),
        {"logisticregression__C": list(grid)},
        cv=StratifiedKFold(3),
        scoring="accuracy",
    ).fit(X, y)
    chosen = head.C_
    assert chosen == reference.best_params_["logisticregression__C"]
    assert chosen != grid[0]  # the CV made a choice, not a fallback


def test_logreg_uses_one_shot_c_with_one_shot() -> None:
    X, y = blobs(4, classes=3, shots=1)
    head = LogRegHead(c_grid=(0.1, 1.0), one_shot_c=123.0).fit(X, y)
    assert head.C_ == 123.0
    reference = LogisticRegression(C=123.0, max_iter=1000).fit(unit(X), y)
    np.testing.assert_allclose(head.predict_proba(X), reference.predict_proba(unit(X)), atol=1e-3)


def test_logreg_falls_back_to_one_shot_c_when_any_class_has_one_shot() -> None:
    X, y = blobs(5, classes=3, shots=3)
    keep = np.r_[0, 3:9]  # class 0 keeps one row, the others three
    head = LogRegHead(one_shot_c=7.0).fit(X[keep], y[keep])
    assert head.C_ == 7.0


# ---------------------------------------------------------------------------------------------- prototype


def test_prototype_is_the_nearest_normalised_class_mean() -> None:
    X, y = blobs(6, classes=4, shots=5, spread=2.0)
    queries, _ = blobs(7, classes=4, shots=25, spread=2.0)
    head = PrototypeHead(temperature=0.1).fit(X, y)
    means = unit(np.stack([unit(X)[y == c].mean(0) for c in range(4)]))  # (C, D) re-normalised means
    cos = unit(queries) @ means.T  # (Q, C)
    np.testing.assert_array_equal(head.predict(queries), cos.argmax(1))
    expected = np.exp(cos / 0.1) / np.exp(cos / 0.1).sum(1, keepdims=True)
    np.testing.assert_allclose(head.predict_proba(queries), expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- linear


def test_linear_learns_a_separable_problem_reproducibly() -> None:
    X, y = blobs(8, classes=4, shots=30, dim=8, spread=0.2)
    X = X * 5 + 3  # the BatchNorm makes the probe indifferent to feature scale and offset
    head = LinearHead(epochs=30, lr=0.1, batch_size=32, random_state=0).fit(X, y)
    assert (head.predict(X) == y).mean() == 1.0
    again = LinearHead(epochs=30, lr=0.1, batch_size=32, random_state=0).fit(X, y)
    np.testing.assert_array_equal(head.predict_proba(X), again.predict_proba(X))


def test_linear_handles_a_trailing_batch_of_one() -> None:
    X, y = blobs(9, classes=3, shots=3)  # 9 rows in batches of 4: 4 + 4 + 1
    head = LinearHead(epochs=2, batch_size=4).fit(X, y)
    assert head.predict_proba(X).shape == (9, 3)


# ---------------------------------------------------------------------------------------------- all heads


def all_heads() -> list:
    return [KNNHead(k=5), LogRegHead(), PrototypeHead(), LinearHead(epochs=5, batch_size=8, random_state=3)]


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("head", all_heads(), ids=lambda h: h.name)
def test_save_load_round_trip_predicts_identically(tmp_path, head, classes: int) -> None:
    X, y = blobs(10, classes=classes, shots=3)
    queries, _ = blobs(11, classes=classes, shots=10)
    head.fit(X, y)
    info = {"classes": [f"c{i}" for i in range(classes)], "backbone": "pixels", "pool": "cls"}
    save_head(head, tmp_path, info)
    meta = json.loads((tmp_path / "head.json").read_text())
    assert meta["head"] == head.name
    assert meta["params"] == json.loads(json.dumps(head.get_params()))
    if head.name == "logreg":
        assert meta["learned"]["C"] == head.C_
    loaded, loaded_info = load_head(tmp_path)
    assert type(loaded) is type(head)
    assert loaded.get_params() == head.get_params()
    assert loaded_info == info
    np.testing.assert_array_equal(loaded.predict_proba(queries), head.predict_proba(queries))
    np.testing.assert_array_equal(loaded.predict(queries), head.predict(queries))
    np.testing.assert_array_equal(loaded.classes_, head.classes_)


@pytest.mark.parametrize("head", all_heads(), ids=lambda h: h.name)
def test_heads_are_sklearn_classifiers(head) -> None:
    X, y = blobs(12, classes=3, shots=4)
    fitted = head.fit(X, y)
    assert fitted is head
    assert list(head.classes_) == [0, 1, 2]
    proba = head.predict_proba(X)
    assert proba.shape == (12, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(head.predict(X), head.classes_[proba.argmax(1)])
    assert clone(head).get_params() == head.get_params()


@pytest.mark.parametrize("head", all_heads(), ids=lambda h: h.name)
def test_heads_reject_bad_input_with_one_line(head) -> None:
    X, y = blobs(13, classes=3, shots=3)
    with pytest.raises(FewshotError, match="at least 2 classes"):
        clone(head).fit(X, np.zeros_like(y))
    head.fit(X, y)
    with pytest.raises(FewshotError, match="same backbone and pool"):
        head.predict(X[:, :5])


# ---------------------------------------------------------------------------------------------- registry, io errors


def test_make_head_reads_its_config_section() -> None:
    cfg = HeadsConfig(knn=KNNConfig(k=3, temperature=0.5), linear=LinearConfig(epochs=7))
    knn = make_head("knn", cfg)
    assert isinstance(knn, KNNHead) and (knn.k, knn.temperature) == (3, 0.5)
    linear = make_head("linear", cfg, random_state=11)
    assert isinstance(linear, LinearHead) and (linear.epochs, linear.random_state) == (7, 11)
    assert make_head("logreg", cfg).get_params()["c_grid"] == cfg.logreg.c_grid
    assert set(HEADS) == {"knn", "logreg", "prototype", "linear", "spread", "selftrain"}


def test_make_head_unknown_name_lists_valid_heads() -> None:
    with pytest.raises(FewshotError, match="unknown head 'svm'; valid heads: knn, logreg, prototype, linear"):
        make_head("svm", HeadsConfig())


def test_load_head_bad_files_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(FewshotError, match="does not exist"):
        load_head(tmp_path / "missing")
    X, y = blobs(14, classes=2, shots=2)
    save_head(PrototypeHead().fit(X, y), tmp_path, {})
    (tmp_path / "head.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FewshotError, match="not a readable safetensors"):
        load_head(tmp_path)
    (tmp_path / "head.json").write_text("{", encoding="utf-8")
    with pytest.raises(FewshotError, match="not valid JSON"):
        load_head(tmp_path)


@pytest.mark.parametrize("name", ["knn", "logreg", "prototype", "linear", "spread", "selftrain"])
def test_each_head_defaults_to_its_config_section(name: str) -> None:
    """One home for defaults: a head built without arguments has exactly its config section's values."""
    params = HEADS[name]().get_params()
    params.pop("random_state", None)  # the episode's seed, not a config value
    assert params == dataclasses.asdict(getattr(HeadsConfig(), name))
    with pytest.raises(TypeError):  # keyword-only: a positional value cannot land on the wrong hyperparameter
        HEADS[name](1)


@pytest.mark.parametrize("name", ["knn", "logreg", "prototype", "linear", "spread", "selftrain"])
def test_dataclass_heads_keep_the_sklearn_estimator_contract(name: str) -> None:
    """The dataclass __init__ only stores the hyperparameters: get_params, set_params and clone see exactly the
    fields; heads keep identity equality and hashing (eq=False) and BaseEstimator's repr (repr=False)."""
    cls = HEADS[name]
    head = cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(head.get_params()) == fields
    assert vars(head) == head.get_params()  # nothing but the hyperparameters is set before fit
    key, value = next((f.name, f.default) for f in dataclasses.fields(cls) if isinstance(f.default, int | float))
    changed = value + 1
    assert head.set_params(**{key: changed}) is head and getattr(head, key) == changed
    copy = clone(head)
    assert type(copy) is cls and copy is not head and copy.get_params() == head.get_params()
    assert copy != head and len({head, copy}) == 2  # identity equality, hashable
    assert repr(head) == f"{cls.__name__}({key}={changed!r})"  # BaseEstimator's repr: the non-default values


def test_centered_head_takes_its_head_positionally() -> None:
    head = CenteredHead(KNNHead(k=3))
    assert head.get_params(deep=False) == {"head": head.head}
    assert clone(head).head.get_params() == {"k": 3, "temperature": KNNConfig.temperature}


@pytest.mark.parametrize(
    ("head", "key", "rule"),
    [
        (KNNHead(k=-5), "heads.knn.k", "≥ 1"),
        (LogRegHead(c_grid=()), "heads.logreg.c_grid", "non-empty, each > 0"),
        (PrototypeHead(temperature=0.0), "heads.prototype.temperature", "> 0"),
        (LinearHead(batch_size=1), "heads.linear.batch_size", "≥ 2"),
        (SpreadHead(alpha=1.0), "heads.spread.alpha", "in (0, 1)"),
        (SelfTrainHead(criterion="best"), "heads.selftrain.criterion", "one of threshold, k_best"),
        (SelfTrainHead(cv_folds=1), "heads.selftrain.cv_folds", "≥ 2"),
        (CenteredHead(KNNHead(k=0)), "heads.knn.k", "≥ 1"),
    ],
    ids=["knn", "logreg", "prototype", "linear", "spread", "selftrain-criterion", "selftrain-cv", "knn+center"],
)
def test_a_head_made_in_python_fails_fit_on_its_config_rule(head, key: str, rule: str) -> None:
    """The value rules live in the config sections only; a head checks its hyperparameters against them in fit."""
    X, y = blobs(18, classes=2, shots=4)
    with pytest.raises(ConfigValueError, match=re.escape(f"config key '{key}' must be {rule}")) as caught:
        head.fit(X, y)
    assert isinstance(caught.value, FewshotError)  # one line on the command line, like any user error
