"""Few-shot classification heads on frozen features, as scikit-learn estimators.

``HEADS`` maps the names used in configs and on the command line to the estimator classes; :func:`make_head`
builds one with its hyperparameters from the matching ``HeadsConfig`` section. A head name may end in ``+center``
(e.g. ``logreg+center``): the head then sees pool-centred, L2-normalised features (:mod:`fewshot.heads.center`).
``spread`` and ``selftrain`` (and every ``+center`` head) use the unlabeled pool (``Head.uses_pool``). Saving and
loading (safetensors + JSON, no pickle) live in :mod:`fewshot.heads.io`.
"""

from __future__ import annotations

import dataclasses

from fewshot.config import HeadsConfig
from fewshot.errors import FewshotError
from fewshot.heads.center import SUFFIX, CenteredHead
from fewshot.heads.io import Head, load_head, save_head
from fewshot.heads.knn import KNNHead
from fewshot.heads.linear import LinearHead
from fewshot.heads.logreg import LogRegHead
from fewshot.heads.prototype import PrototypeHead
from fewshot.heads.selftrain import SelfTrainHead
from fewshot.heads.spread import SpreadHead

HEADS: dict[str, type[Head]] = {
    "knn": KNNHead,
    "logreg": LogRegHead,
    "prototype": PrototypeHead,
    "linear": LinearHead,
    "spread": SpreadHead,
    "selftrain": SelfTrainHead,
}
ALL_HEADS: dict[str, type[Head]] = {**HEADS, CenteredHead.name: CenteredHead}  # what a saved head.json may name

__all__ = [
    "ALL_HEADS",
    "HEADS",
    "CenteredHead",
    "Head",
    "KNNHead",
    "LinearHead",
    "LogRegHead",
    "PrototypeHead",
    "SelfTrainHead",
    "SpreadHead",
    "check_head_name",
    "load_head",
    "make_head",
    "save_head",
]


def check_head_name(name: str) -> str:
    """The base head of ``name`` (``logreg`` for ``logreg+center``); a one-line error for an unknown name."""
    base = name.removesuffix(SUFFIX)
    if base not in HEADS:
        valid = ", ".join(HEADS)
        raise FewshotError(f"unknown head '{name}'; valid heads: {valid} (add {SUFFIX} to centre any of them)")
    return base


def make_head(name: str, cfg: HeadsConfig, random_state: int = 0) -> Head:
    """A fresh head ``name`` with hyperparameters from ``cfg.<name>``; ``random_state`` seeds heads that train."""
    base = check_head_name(name)
    cls = HEADS[base]
    params = dataclasses.asdict(getattr(cfg, base))
    if "random_state" in cls().get_params():
        params["random_state"] = random_state
    head = cls(**params)
    return CenteredHead(head) if name.endswith(SUFFIX) else head
