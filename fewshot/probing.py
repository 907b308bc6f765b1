"""Fit a few-shot head on frozen features (``fewshot probe``) and apply it to new images (``fewshot predict``).

A saved head is a folder: ``head.safetensors`` + ``head.json`` (head, hyperparameters, classes, the exact feature
extraction it expects and the backbone it was fitted on) + ``config.json``. The backbone is recorded as typed and
resolved to an absolute path, with its weights' sha256: ``predict`` rebuilds that backbone from any working
directory and refuses one whose weights have changed since (retrained, replaced), because the head's features
would silently no longer match.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.config import Config, ExtractConfig, save_config, to_dict
from fewshot.errors import FewshotError


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`probe` returns; ``head.json`` records the same fields."""

    head: str
    backbone: str  # as given
    pool: str  # token pooling of the features
    classes: list[str]
    shots: int | None  # labels per class; None: every label
    support_size: int
    seed: int
    train: str
    skipped_train: list[dict[str, str]]
    pool_size: int  # unlabeled images a pool head saw (0 for the others)
    unlabeled: str | None  # ``pool.unlabeled`` when a pool head used it
    skipped_unlabeled: list[dict[str, str]]
    overlaps: list[dict[str, str]]  # TEST images allowed (--allow-overlap) to also be in TRAIN or the pool
    C: float | None = None  # the logistic regression's chosen C, for heads that choose one
    test: str | None = None  # with ``test``: its size, accuracy, balanced accuracy and skipped files
    test_size: int = 0
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    skipped_test: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Predictions:
    """What :func:`predict` returns: one ``{"path", "label", "score"}`` row per readable image, and the skipped."""

    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]]


def probe(
    train: str | Path,
    out: str | Path,
    cfg: Config | None = None,
    *,
    test: str | Path | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Fit ``cfg.probe.head`` on ``cfg.probe.shots`` labels per class of ``train``; save it to ``out``.

    Parameters
    ----------
    train : labelled images, any data source :func:`fewshot.sources.open_source` accepts.
    out : the head's folder (``head.safetensors`` + ``head.json`` + ``config.json``), for :func:`predict`.
    cfg : ``cfg.probe`` (head, shots, seed), ``cfg.heads`` (its hyperparameters), ``cfg.extract`` (backbone),
        ``cfg.pool`` (the unlabeled pool); defaults when None.
    test : labelled images to score the fitted head on; first checked against TRAIN and the pool by file content
        (:mod:`fewshot.leakage`).
    progress : show progress bars.

    Returns
    -------
    ProbeResult : the head's name, support size, chosen hyperparameters and, with ``test``, its accuracy. A pool
    head (``spread``, ``selftrain``, ``HEAD+center``) also gets TRAIN's images outside the support and the
    ``cfg.pool.unlabeled`` images as unlabeled pool (:mod:`fewshot.unlabeled`).
    """
    from fewshot.outputs import check_folder, folder_lock
    from fewshot.specs import absolute_spec

    cfg = cfg or Config()
    out = check_folder(out)  # before any extraction
    with folder_lock(out):
        return _probe(train, out, test, cfg, absolute_spec(cfg.extract.backbone), progress)


def _probe(
    train: str | Path, out: Path, test: str | Path | None, cfg: Config, spec: str, progress: bool
) -> ProbeResult:
    from fewshot.episodes import align_classes, confusion_counts, scores
    from fewshot.features import extract_features
    from fewshot.heads import make_head
    from fewshot.heads.io import save_head
    from fewshot.leakage import check_sources
    from fewshot.sampling import sample_support
    from fewshot.sources import no_labels_message

    pcfg, typed = cfg.probe, cfg.extract.backbone
    head = make_head(pcfg.head, cfg.heads, random_state=pcfg.seed)
    overlaps = []
    if test is not None:  # before any extraction: TEST must not also be in TRAIN or the pool
        others = {"TRAIN": train, "the unlabeled pool": cfg.pool.unlabeled}
        overlaps = check_sources(test, others, allow=cfg.probe.allow_overlap)
    ecfg = dataclasses.replace(cfg.extract, backbone=spec)
    feats = extract_features(train, ecfg, progress=progress)
    if not feats.classes:
        raise FewshotError(no_labels_message(train))
    labelled = np.flatnonzero(feats.labels >= 0)
    if pcfg.shots is None:
        support = labelled
    else:
        support = labelled[sample_support(feats.labels[labelled], pcfg.shots, pcfg.seed, feats.classes)]
    X, y = feats.features[support], feats.labels[support]
    extra = None
    if head.uses_pool:
        from fewshot.unlabeled import with_pool

        extra = extract_features(cfg.pool.unlabeled, ecfg, progress=progress) if cfg.pool.unlabeled else None
        x_extra = None if extra is None else extra.features
        X, y = with_pool(feats.features, feats.labels, support, x_extra, cfg.pool.max_images, pcfg.seed)
    head.fit(X, y)
    result = ProbeResult(
        head=pcfg.head, backbone=typed, pool=feats.meta.get("pool", ecfg.pool), classes=feats.classes,
        shots=pcfg.shots, support_size=len(support), seed=pcfg.seed, train=str(train), skipped_train=feats.skipped,
        pool_size=int((y < 0).sum()), unlabeled=cfg.pool.unlabeled if head.uses_pool else None,
        skipped_unlabeled=extra.skipped if extra is not None else [], overlaps=overlaps,
        C=float(head.C_) if hasattr(head, "C_") else None,
    )  # fmt: skip
    if test is not None:
        tfeats = align_classes(feats, extract_features(test, ecfg, progress=progress))
        pred = head.predict(tfeats.features)
        # balanced accuracy over the classes TEST holds (as evaluate reports it)
        accuracy, balanced = scores(confusion_counts(tfeats.labels, pred, len(feats.classes)))
        result = dataclasses.replace(result, test=str(test), test_size=len(pred), accuracy=accuracy,
                                     balanced_accuracy=balanced, skipped_test=tfeats.skipped)  # fmt: skip
    info = {
        **dataclasses.asdict(result),
        "extract": to_dict(ecfg),
        "backbone_typed": typed,  # as the user wrote it; extract.backbone holds it resolved (absolute paths)
        "weights_sha256": feats.meta.get("weights_sha256", ""),
    }
    save_head(head, out, info)
    save_config(cfg, out / "config.json", command="probe", train=str(train), test=str(test) if test else None)
    return result


def predict(
    images: str | Path,
    head_dir: str | Path,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    allow_backbone_change: bool = False,
) -> Predictions:
    """Label every readable image in ``images`` with a saved head.

    Parameters
    ----------
    images : any data source :func:`fewshot.sources.open_source` accepts.
    head_dir : a folder written by :func:`probe`; its backbone is the one recorded there.
    out : a CSV file to write (``path,label,score``); None: only return the rows.
    progress : show a progress bar.
    allow_backbone_change : predict even if the backbone's weights changed since the head was fitted (refused
        otherwise: its features may no longer match the head).

    Returns
    -------
    Predictions : one row per readable image, and the skipped files. A ``spread`` head scores the images together
    with its saved support and pool (transductive); the other heads score each image on its own.
    """
    from fewshot.backbones import load_backbone
    from fewshot.features import extract_features
    from fewshot.heads.io import load_head
    from fewshot.outputs import check_file, write_csv
    from fewshot.specs import spec_base

    if out is not None:
        out = check_file(out)  # before any extraction
    head, info = load_head(Path(head_dir))
    try:
        ecfg = dataclasses.replace(ExtractConfig(), **info["extract"])
        classes, fitted_on = list(info["classes"]), str(info["weights_sha256"])
        typed = str(info.get("backbone_typed", ecfg.backbone))
    except (KeyError, TypeError) as exc:
        raise FewshotError(f"'{head_dir}/head.json' lacks {exc}; re-create the head with fewshot probe") from None
    recorded = Path(spec_base(ecfg.backbone))  # absolute when it is a file or a run folder
    if recorded.is_absolute() and not recorded.exists():
        raise FewshotError(
            f"the head's backbone {recorded} (given as '{typed}' to probe) no longer exists; restore it, or re-run "
            "`fewshot probe` with the backbone you have"
        )
    backbone = load_backbone(ecfg.backbone)
    if backbone.weights_sha256 != fitted_on and not allow_backbone_change:
        raise FewshotError(
            f"the backbone '{typed}' has changed since the head was fitted (weights {backbone.weights_sha256[:16]}, "
            f"the head expects {fitted_on[:16]}): its features no longer match the head. Re-run `fewshot probe` "
            "on it, or pass --allow-backbone-change to predict anyway"
        )
    feats = extract_features(images, ecfg, progress=progress, backbone=backbone)
    proba = head.predict_proba(feats.features)  # (N, C)
    best = proba.argmax(axis=1)
    rows = [
        {"path": path, "label": classes[int(head.classes_[b])], "score": float(p[b])}
        for path, b, p in zip(feats.paths, best, proba, strict=True)
    ]
    if out is not None:
        write_csv(out, ["path", "label", "score"], ({**r, "score": f"{r['score']:.6f}"} for r in rows))
    return Predictions(rows, feats.skipped)
