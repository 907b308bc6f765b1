"""Self-supervised pretraining methods, by name (``--method``). Values are ``module:Class`` so that listing
the names imports nothing heavy; :func:`get_method` imports the class."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fewshot.errors import FewshotError

if TYPE_CHECKING:
    from fewshot.methods.base import Method

METHODS: dict[str, str] = {
    "dino": "fewshot.methods.dino:DINO",
    "mae": "fewshot.methods.mae:MAE",
}


def get_method(name: str) -> type[Method]:
    """The :class:`fewshot.methods.base.Method` subclass registered as ``name``."""
    if name not in METHODS:
        raise FewshotError(f"unknown pretraining method '{name}'; choose one of: {', '.join(METHODS)}")
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
