"""Few-shot classification heads on frozen features, as scikit-learn estimators.

``HEADS`` maps the names used in configs and on the command line to the estimator classes; :func:`make_head`
builds one with its hyperparameters from the matching ``HeadsConfig`` section. Saving and loading (safetensors
+ JSON, no pickle) live in :mod:`fewshot.heads.io`.
"""

from __future__ import annotations

import dataclasses

from fewshot.config import HeadsConfig
from fewshot.errors import FewshotError
from fewshot.heads.io import Head, load_head, save_head
from fewshot.heads.knn import KNNHead
from fewshot.heads.linear import LinearHead
from fewshot.heads.logreg import LogRegHead
from fewshot.heads.prototype import PrototypeHead

HEADS: dict[str, type[Head]] = {
    "knn": KNNHead,
    "logreg": LogRegHead,
    "prototype": PrototypeHead,
    "linear": LinearHead,
}

__all__ = [
    "HEADS",
    "Head",
    "KNNHead",
    "LinearHead",
    "LogRegHead",
    "PrototypeHead",
    "load_head",
    "make_head",
    "save_head",
]


def make_head(name: str, cfg: HeadsConfig, random_state: int = 0) -> Head:
    """A fresh head ``name`` with hyperparameters from ``cfg.<name>``; ``random_state`` seeds heads that train."""
    if name not in HEADS:
        raise FewshotError(f"unknown head '{name}'; valid heads: {', '.join(HEADS)}")
    cls = HEADS[name]
    params = dataclasses.asdict(getattr(cfg, name))
    if "random_state" in cls().get_params():
        params["random_state"] = random_state
    return cls(**params)
