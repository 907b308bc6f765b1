"""Fit a few-shot head on frozen features (``fewshot probe``) and apply it to new images (``fewshot predict``).

A saved head is a folder: ``head.safetensors`` + ``head.json`` (head, hyperparameters, classes and the exact
feature extraction it expects) + ``config.json``; ``predict`` rebuilds the same backbone and pooling from it.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.config import Config, ExtractConfig, save_config, to_dict
from fewshot.errors import FewshotError


def probe(
    train: str | Path,
    out: str | Path,
    test: str | Path | None = None,
    cfg: Config | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit ``cfg.probe.head`` on ``cfg.probe.shots`` labels per class of ``train``; save it to ``out``.

    Returns a summary: the head, support size, chosen hyperparameters and, with ``test``, its accuracy. A pool
    head (``spread``, ``selftrain``, ``HEAD+center``) also gets TRAIN's images outside the support and the
    ``cfg.pool.unlabeled`` images as unlabeled pool (:mod:`fewshot.unlabeled`). With ``test``, TEST is first checked
    against TRAIN and the pool by file content (:mod:`fewshot.leakage`).
    """
    from sklearn.metrics import balanced_accuracy_score

    from fewshot.evaluation import align_classes
    from fewshot.features import extract_features
    from fewshot.heads import make_head
    from fewshot.heads.io import save_head
    from fewshot.leakage import check_sources
    from fewshot.sampling import sample_support

    cfg = cfg or Config()
    pcfg = cfg.probe
    head = make_head(pcfg.head, cfg.heads, random_state=pcfg.seed)
    overlaps = []
    if test is not None:  # before any extraction: TEST must not also be in TRAIN or the pool
        others = {"TRAIN": train, "the unlabeled pool": cfg.pool.unlabeled}
        overlaps = check_sources(test, others, allow=cfg.probe.allow_overlap)
    feats = extract_features(train, cfg.extract, progress=progress)
    if not feats.classes:
        raise FewshotError(f"'{train}' has no labels; probe needs an ImageFolder or a CSV with a label column")
    labelled = np.flatnonzero(feats.labels >= 0)
    if pcfg.shots is None:
        support = labelled
    else:
        support = labelled[sample_support(feats.labels[labelled], pcfg.shots, pcfg.seed, feats.classes)]
    X, y = feats.features[support], feats.labels[support]
    extra = None
    if head.uses_pool:
        from fewshot.unlabeled import with_pool

        extra = extract_features(cfg.pool.unlabeled, cfg.extract, progress=progress) if cfg.pool.unlabeled else None
        x_extra = None if extra is None else extra.features
        X, y = with_pool(feats.features, feats.labels, support, x_extra, cfg.pool.max_images, pcfg.seed)
    head.fit(X, y)
    summary: dict[str, Any] = {
        "head": pcfg.head,
        "backbone": cfg.extract.backbone,
        "pool": cfg.extract.pool,
        "classes": feats.classes,
        "shots": pcfg.shots,
        "support_size": len(support),
        "seed": pcfg.seed,
        "train": str(train),
        "skipped_train": feats.skipped,
        "pool_size": int((y < 0).sum()),
        "unlabeled": cfg.pool.unlabeled if head.uses_pool else None,
        "skipped_unlabeled": extra.skipped if extra is not None else [],
        "overlaps": overlaps,
    }
    if hasattr(head, "C_"):
        summary["C"] = float(head.C_)
    if test is not None:
        tfeats = align_classes(feats, extract_features(test, cfg.extract, progress=progress))
        pred = head.predict(tfeats.features)
        summary["test"] = str(test)
        summary["test_size"] = len(pred)
        summary["accuracy"] = float(np.mean(pred == tfeats.labels))
        summary["balanced_accuracy"] = float(balanced_accuracy_score(tfeats.labels, pred))
        summary["skipped_test"] = tfeats.skipped
    out = Path(out)
    info = {**summary, "extract": to_dict(cfg.extract), "weights_sha256": feats.meta.get("weights_sha256", "")}
    save_head(head, out, info)
    save_config(cfg, out / "config.json", command="probe", train=str(train), test=str(test) if test else None)
    return summary


def predict(
    images: str | Path, head_dir: str | Path, out: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Label every readable image in ``images`` with a saved head; write ``path,label,score`` CSV to ``out``.

    A ``spread`` head scores the images together with its saved support and pool (it spreads labels again over
    all of them: transductive); ``selftrain`` and ``HEAD+center`` heads score each image on its own.

    Returns ``{"predictions": [{"path", "label", "score"}, ...], "skipped": [{"path", "reason"}, ...]}``.
    """
    from fewshot.features import extract_features
    from fewshot.heads.io import load_head

    head, info = load_head(Path(head_dir))
    try:
        ecfg = dataclasses.replace(ExtractConfig(), **info["extract"])
        classes = list(info["classes"])
    except (KeyError, TypeError) as exc:
        raise FewshotError(f"'{head_dir}/head.json' lacks {exc}; re-create the head with fewshot probe") from None
    feats = extract_features(images, ecfg, progress=progress)
    proba = head.predict_proba(feats.features)  # (N, C)
    best = proba.argmax(axis=1)
    rows = [
        {"path": path, "label": classes[int(head.classes_[b])], "score": float(p[b])}
        for path, b, p in zip(feats.paths, best, proba, strict=True)
    ]
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "label", "score"])
            writer.writeheader()
            writer.writerows({**r, "score": f"{r['score']:.6f}"} for r in rows)
    return {"predictions": rows, "skipped": feats.skipped}
