"""fewshot: self-supervised ViTs (DINO, MAE) for few-shot image classification in a specialised domain.

The Python API mirrors the CLI: :func:`pretrain`, :func:`extract`, :func:`probe`, :func:`predict`,
:func:`evaluate`, :func:`run_attention` (``fewshot attention``) and :func:`select_images` (``fewshot select``).
They are imported lazily so that ``import fewshot`` (and ``fewshot --help``) stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "pretrain": "fewshot.train",
    "extract": "fewshot.features",
    "probe": "fewshot.probing",
    "predict": "fewshot.probing",
    "evaluate": "fewshot.evaluation",
    "run_attention": "fewshot.attention_outputs",
    "select_images": "fewshot.labelling",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fewshot' has no attribute {name!r}")
