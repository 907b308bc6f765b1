"""Saving and loading heads without pickle: learned arrays in ``head.safetensors``, the rest in ``head.json``.

Every head subclasses :class:`Head` and keeps one contract: ``to_state()`` returns its learned state as named
numpy arrays (0-d arrays for scalars such as ``C_``), and ``from_state(params, state)`` rebuilds a fitted head
that predicts identically. Scalars go to the JSON file (readable), everything else to safetensors. A head that
wraps another (``CenteredHead``) has that head as a hyperparameter: it is written as its name and hyperparameters
and rebuilt, unfitted, before ``from_state``.

Heads with ``uses_pool`` take the unlabeled pool in ``fit`` by scikit-learn's semi-supervised convention: pool rows
carry the label -1.

Each head declares its hyperparameters once, as dataclass fields whose defaults are its ``fewshot.config`` section's
(``@dataclass(kw_only=True, eq=False, repr=False)``: the generated ``__init__`` only stores them, as scikit-learn's
``get_params``/``clone`` expect; identity equality and hashing and BaseEstimator's repr are kept). Their value
rules live in that section only (``Head.config``): ``fit`` checks a head's values by building the section from
them, so a head made in Python fails as a bad recipe value would.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from fewshot.config_rules import ConfigValueError
from fewshot.errors import FewshotError
from fewshot.outputs import save_tensors, write_text

FORMAT = "fewshot-head"
VERSION = 2  # 2: info records the backbone resolved to an absolute path and its weights hash
WEIGHTS_FILE = "head.safetensors"
META_FILE = "head.json"


class Head(ClassifierMixin, BaseEstimator):
    """Shared checks, ``predict`` and the persistence contract of every few-shot head."""

    name: ClassVar[str]  # registry key, written to head.json
    uses_pool: ClassVar[bool] = False  # fit takes support + pool rows, the pool labelled -1
    config: ClassVar[type | None] = None  # the fewshot.config section that holds the hyperparameters' value rules
    # A head whose learned state is just the rows and labels it was fitted on (k-NN's support; spread's support
    # and pool) names their two state keys here, and from_state refits on them.
    data_keys: ClassVar[tuple[str, str] | None] = None

    def check_params(self) -> None:
        """Raise :class:`ConfigValueError`, naming the key (``heads.knn.k``), for a hyperparameter outside the rules
        of the head's config section; hyperparameters the section lacks (``random_state``) are not checked."""
        if self.config is None:
            return
        fields = {f.name for f in dataclasses.fields(self.config)}
        try:
            self.config(**{k: v for k, v in self.get_params(deep=False).items() if k in fields})
        except ConfigValueError as exc:
            raise ConfigValueError(f"heads.{self.name}.{exc.key}", exc.value, exc.rule) from None

    def _validate_fit(self, X: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Check the hyperparameters, ``X`` (N, D) float32 and ``y`` (N,) labels (int64 for a pool head, -1 for
        the pool); set ``classes_`` (the labelled classes) and ``n_features_in_``. The first step of every fit."""
        self.check_params()
        features, given = validate_data(self, X, y, dtype=np.float32, reset=True)  # (N, D), (N,)
        labels, self.classes_ = check_labels(self.name, given, pool=self.uses_pool)  # (N,)
        return features, labels

    def _validate_predict(self, X: ArrayLike) -> np.ndarray:
        """Check ``X`` against the fitted head; a feature-size mismatch is a user error (wrong backbone/pool)."""
        check_is_fitted(self)
        n_features = np.shape(X)[-1] if np.ndim(X) == 2 else None
        if n_features != self.n_features_in_:
            raise FewshotError(
                f"features have shape {np.shape(X)} but the {self.name} head was fitted on {self.n_features_in_}-d "
                "features; use the same backbone and pool as when the head was fitted"
            )
        return validate_data(self, X, dtype=np.float32, reset=False)

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The class of the highest score: of ``decision_function`` where the head has one (the raw scores, whose
        near-ties a softmax could round together), else of ``predict_proba``."""
        scores = self.decision_function(X) if hasattr(self, "decision_function") else self.predict_proba(X)
        return self.classes_[np.argmax(scores, axis=1)]  # (Q,)

    def to_state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def from_state(cls, params: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Self:
        if cls.data_keys is None:
            raise NotImplementedError(f"{cls.__name__} has no data_keys; it must define from_state")
        # Fitting such a head only keeps its rows and labels, so refitting on them rebuilds the identical head.
        rows, labels = cls.data_keys
        return cls(**params).fit(state[rows], state[labels])


def check_labels(name: str, y: ArrayLike, pool: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``y`` (N,) and its labelled classes, of which there must be at least 2. With ``pool``, rows labelled -1 are
    the unlabeled pool (scikit-learn's semi-supervised convention), not a class, and ``y`` is cast to int64."""
    check_classification_targets(y)  # before the cast, which would hide continuous labels
    labels = np.asarray(y, dtype=np.int64) if pool else np.asarray(y)  # (N,)
    classes = np.unique(labels[labels >= 0] if pool else labels)
    if len(classes) < 2:
        raise FewshotError(
            f"the {name} head needs labelled examples of at least 2 classes, got {len(classes)}; "
            "add images of another class"
        )
    return labels, classes


def _params_to_json(head: Head) -> dict[str, Any]:
    """Hyperparameters for head.json; a wrapped head becomes {"head": name, "params": {...}}."""
    return {
        k: {"head": v.name, "params": _params_to_json(v)} if isinstance(v, Head) else v
        for k, v in head.get_params(deep=False).items()
    }


def _params_from_json(params: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_params_to_json`: lists back to tuples (JSON has no tuples), wrapped heads rebuilt."""
    from fewshot.heads import ALL_HEADS  # here, not at the top: fewshot.heads imports this module

    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict) and set(v) == {"head", "params"} and v["head"] in ALL_HEADS:
            out[k] = ALL_HEADS[v["head"]](**_params_from_json(v["params"]))
        else:
            out[k] = tuple(v) if isinstance(v, list) else v
    return out


def save_head(head: Head, directory: Path, info: Mapping[str, Any]) -> None:
    """Write ``head.safetensors`` (learned arrays) and ``head.json`` (name, hyperparameters, scalars, ``info``)."""
    check_is_fitted(head)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = head.to_state()
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items() if np.ndim(v) > 0}
    scalars = {k: np.asarray(v).item() for k, v in state.items() if np.ndim(v) == 0}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "head": head.name,
        "params": _params_to_json(head),
        "learned": scalars,
        "info": dict(info),
    }
    try:
        text = json.dumps(meta, indent=2) + "\n"
    except TypeError as exc:
        raise FewshotError(f"head info is not JSON-serialisable ({exc}); pass plain str/int/float/list/dict") from None
    save_tensors(directory / WEIGHTS_FILE, arrays)
    write_text(directory / META_FILE, text)


def load_head(directory: Path) -> tuple[Head, dict[str, Any]]:
    """Rebuild the head saved by :func:`save_head` in ``directory``; returns ``(head, info)``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from fewshot.heads import ALL_HEADS  # here, not at the top: fewshot.heads imports this module

    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    redo = "re-run `fewshot probe` to save the head again"
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise FewshotError(f"{path} does not exist; point to a directory written by `fewshot probe` or {redo}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FewshotError(f"{meta_path} is not valid JSON ({exc}); {redo}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FewshotError(f"{meta_path} is not a fewshot head file; {redo}")
    if meta.get("version") != VERSION:
        raise FewshotError(f"{meta_path} has head format version {meta.get('version')}, expected {VERSION}; {redo}")
    name = meta.get("head")
    if name not in ALL_HEADS:
        raise FewshotError(f"{meta_path} names unknown head {name!r}; valid heads: {', '.join(ALL_HEADS)}")
    try:
        arrays = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise FewshotError(f"{weights_path} is not a readable safetensors file ({exc}); {redo}") from None
    params, learned, info = meta.get("params"), meta.get("learned"), meta.get("info")
    if not (isinstance(params, dict) and isinstance(learned, dict) and isinstance(info, dict)):
        raise FewshotError(f"{meta_path} lacks its 'params', 'learned' or 'info' section; {redo}")
    state: dict[str, np.ndarray] = {**arrays, **{k: np.asarray(v) for k, v in learned.items()}}
    try:
        # JSON turns tuples into lists; hyperparameters such as c_grid are tuples in the config.
        head = ALL_HEADS[name].from_state(_params_from_json(params), state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise FewshotError(f"{directory} holds an incomplete or incompatible {name} head ({exc}); {redo}") from None
    return head, info
