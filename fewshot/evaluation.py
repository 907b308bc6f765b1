"""Label-efficiency evaluation: few-shot accuracy of every backbone × head × shot count, with honest error bars.

Protocol (as in the few-shot linear-probe evaluations of DINO, Caron et al. 2021, and MSN, Assran et al.
2022): for each shot count k, ``cfg.evaluate.seeds`` class-balanced supports of k labelled images per class
are drawn from TRAIN (seed ``cfg.evaluate.seed + i``); a head is fitted on the support and scored on ALL of
TEST. The same supports are used for every backbone and head, so differences between them are paired
comparisons, not luck of the draw. Each configuration reports the mean over seeds with a 95% Student-t
interval (half-width ``t_{0.975, n-1} · s / √n``; zero when there is a single seed). A k-NN on every TRAIN
label (DINO's weighted k-NN, Wu et al. 2018) gives each backbone's full-label reference point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from fewshot.config import Config
from fewshot.episodes import align_classes, check_evaluate_config, run_episodes
from fewshot.errors import FewshotError
from fewshot.features import Features


class Report(TypedDict):
    """What :func:`evaluate` returns and ``report.json`` holds (rows are plain JSON objects)."""

    classes: list[str]
    train_images: int
    test_images: int
    test_per_class: list[int]  # TEST images per class, in ``classes`` order
    backbones: list[str]
    heads: list[str]
    select: list[str]
    shots: list[int]
    seeds: int
    headline: list[str]  # the comparisons that lead the report, as sentences
    references: dict[str, str]  # backbone -> the backbone it is compared with
    comparisons: list[dict[str, Any]]  # paired differences (fewshot.comparisons)
    pool: dict[str, Any]  # the unlabeled pool's source and size
    results: list[dict[str, Any]]  # one row per backbone x head x selection x shot count: mean, CI, per seed
    full_knn: list[dict[str, Any]]  # each backbone's k-NN with every TRAIN label
    best: dict[str, Any] | None  # the best row at the largest shot count, with per-class accuracy
    skipped: list[dict[str, str]]
    skipped_count: int
    backbone_notes: dict[str, str]  # warnings that travel with a backbone, e.g. an unfinished run
    overlaps: list[dict[str, str]]  # TEST images also in TRAIN or the pool, allowed by --allow-overlap
    overlap_count: int


def build_report(
    rows: list[dict],
    feats: dict[str, tuple[Features, Features]],
    cfg: Config,
    references: Mapping[str, str] | None = None,
    overlaps: list[dict] | None = None,
    unlabeled: dict[str, Features] | None = None,
) -> Report:
    """The report dict (what ``report.json`` holds) from :func:`run_episodes` rows and the features used.

    ``references`` maps a backbone to the backbone it is compared with, paired by seed (default: every backbone
    against ``evaluate.reference``, else pixels); ``overlaps`` are TEST images allowed to also be in TRAIN or the
    pool (:mod:`fewshot.leakage`); ``unlabeled`` the extra pool's features per backbone.
    """
    from fewshot.comparisons import all_comparisons, backbone_references, compare, headline
    from fewshot.inits import init_references

    train, test = next(iter(feats.values()))
    classes = list(train.classes)
    results = [r for r in rows if r["shots"] is not None]
    full_knn = [{k: v for k, v in r.items() if k != "confusion"} for r in rows if r["shots"] is None]
    for r in full_knn:
        r["labels"] = int((np.asarray(train.labels) >= 0).sum())
    best = None
    if results:
        top = max(r["shots"] for r in results)
        pick = max((r for r in results if r["shots"] == top), key=lambda r: r["accuracy"])  # first wins ties
        confusion = np.asarray(pick["confusion"])
        support = confusion.sum(axis=1)
        per_class = {
            name: (float(confusion[i, i] / support[i]) if support[i] else None) for i, name in enumerate(classes)
        }
        best = {**{k: v for k, v in pick.items() if k != "per_seed"}, "per_class_accuracy": per_class}
    skipped = []
    splits = {"train": [p[0] for p in feats.values()], "test": [p[1] for p in feats.values()]}
    splits["unlabeled"] = list((unlabeled or {}).values())
    for split, parts in splits.items():
        seen = set()
        for part in parts:  # every backbone reads the same files; list each skipped file once
            for item in part.skipped:
                if item.get("path") not in seen:
                    seen.add(item.get("path"))
                    skipped.append({"split": split, **item})
    ev = cfg.evaluate
    if references is None:
        references = backbone_references(list(feats), ev.reference)
    comparisons = all_comparisons(rows, references, ev.select, ev.heads, ev.reference_head)
    # each run against the weights it started from, when those were evaluated too (-b RUN -b RUN:init)
    inits = {run: init for run, init in init_references(feats).items() if references.get(run) != init}
    comparisons += compare(results, "backbone", inits, kind="init")
    return {
        "classes": classes,
        "train_images": len(train.labels),
        "test_images": len(test.labels),
        "test_per_class": np.bincount(align_classes(train, test).labels, minlength=len(classes)).tolist(),
        "backbones": list(feats),
        "heads": list(cfg.evaluate.heads),
        "select": list(dict.fromkeys(cfg.evaluate.select)),
        "shots": sorted(set(cfg.evaluate.shots)),
        "seeds": cfg.evaluate.seeds,
        "headline": headline(comparisons, results),
        "references": dict(references),
        "comparisons": comparisons,
        "pool": {
            "unlabeled": cfg.pool.unlabeled,
            "unlabeled_images": len(next(iter(unlabeled.values())).labels) if unlabeled else 0,
            "max_images": cfg.pool.max_images,
        },
        "results": [{k: v for k, v in r.items() if k != "confusion"} for r in results],
        "full_knn": full_knn,
        "best": best,
        "skipped": skipped,
        "skipped_count": len(skipped),
        "backbone_notes": {b: f[0].meta["backbone_note"] for b, f in feats.items() if f[0].meta.get("backbone_note")},
        "overlaps": overlaps or [],
        "overlap_count": len(overlaps or []),
    }


def evaluate(
    train: str | Path,
    test: str | Path,
    out: str | Path | None = None,
    cfg: Config | None = None,
    *,
    backbones: list[str] | None = None,
    references: Mapping[str, str] | None = None,
    progress: bool = True,
) -> Report:
    """Few-shot label-efficiency evaluation of backbones on a labelled TRAIN/TEST pair.

    Parameters
    ----------
    train, test : labelled images, any data sources :func:`fewshot.sources.open_source` accepts (TEST's classes a
        subset of TRAIN's). Before any extraction TEST is checked against TRAIN and the unlabeled pool by file
        content (:mod:`fewshot.leakage`).
    out : a folder for ``report.json``, ``report.md``, the plots and the resolved ``config.json``; None: no files.
    cfg : ``cfg.evaluate`` (backbones, shots, seeds, heads, selection strategies, reference), ``cfg.heads``,
        ``cfg.extract``, ``cfg.pool``; defaults when None.
    backbones : override ``cfg.evaluate.backbones``.
    references : extra ``{backbone: reference backbone}`` pairs for the paired comparisons (by default every
        backbone is compared with ``cfg.evaluate.reference``, else pixels).
    progress : show progress bars.

    Returns
    -------
    Report : the report (what ``report.json`` holds): accuracy with 95% intervals per backbone × head × selection ×
    shot count, the paired comparisons and the sentences that lead with them.
    """
    from fewshot.outputs import check_folder, folder_lock

    cfg = cfg if cfg is not None else Config()
    if isinstance(backbones, str):
        backbones = [backbones]
    if backbones:
        cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, backbones=tuple(backbones)))
    check_evaluate_config(cfg)
    if out is None:
        return _evaluate(train, test, cfg, None, progress, references)
    out = check_folder(out)  # before minutes of extraction
    with folder_lock(out):
        return _evaluate(train, test, cfg, out, progress, references)


def _evaluate(
    train: str | Path,
    test: str | Path,
    cfg: Config,
    out: Path | None,
    progress: bool,
    references: Mapping[str, str] | None,
) -> Report:
    from fewshot.comparisons import backbone_references
    from fewshot.config import save_config
    from fewshot.features import extract_features
    from fewshot.heads import make_head
    from fewshot.leakage import check_sources
    from fewshot.report import write_report
    from fewshot.sources import no_labels_message

    extra = cfg.pool.unlabeled
    overlaps = check_sources(test, {"TRAIN": train, "the unlabeled pool": extra}, allow=cfg.evaluate.allow_overlap)
    uses_pool = any(getattr(make_head(h, cfg.heads), "uses_pool", False) for h in cfg.evaluate.heads)
    feats: dict[str, tuple[Features, Features]] = {}
    unlabeled: dict[str, Features] = {}
    for spec in dict.fromkeys(cfg.evaluate.backbones):  # de-duplicated, order kept
        extract_cfg = dataclasses.replace(cfg.extract, backbone=spec)
        feats[spec] = (
            extract_features(train, extract_cfg, progress=progress),
            extract_features(test, extract_cfg, progress=progress),
        )
        for split, name in ((feats[spec][0], train), (feats[spec][1], test)):
            if not split.classes:  # before any other backbone is extracted
                raise FewshotError(no_labels_message(name) + " (evaluate needs labelled TRAIN and TEST)")
        if extra and uses_pool:
            unlabeled[spec] = extract_features(extra, extract_cfg, progress=progress)
    pairs = {**backbone_references(list(feats), cfg.evaluate.reference), **(references or {})}
    rows = run_episodes(feats, cfg, progress=progress, unlabeled=unlabeled or None)
    report = build_report(rows, feats, cfg, references=pairs, overlaps=overlaps, unlabeled=unlabeled or None)
    if out is not None:
        write_report(report, out)
        save_config(cfg, out / "config.json")
    return report
