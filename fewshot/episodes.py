"""The few-shot protocol behind ``fewshot evaluate``: draw supports, fit every head on each, score it on all of TEST.

For each shot count k, ``cfg.evaluate.seeds`` supports of k labelled images per class are drawn from TRAIN (seed
``cfg.evaluate.seed + i``; the class-balanced draw, or a selection strategy of :mod:`fewshot.selection` picking
k × classes images from the features without their labels), as in the few-shot linear-probe evaluations of DINO
(Caron et al. 2021) and MSN (Assran et al. 2022). Random supports are the very same images for every backbone and
head, so differences between them are paired. Each configuration gets its per-seed accuracies, their mean with a
95% Student-t interval, and its summed confusion matrix; a k-NN on every TRAIN label (DINO's weighted k-NN, Wu et
al. 2018) gives each backbone's full-label reference point.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from fewshot.config import Config
from fewshot.errors import FewshotError
from fewshot.features import Features
from fewshot.sampling import sample_support
from fewshot.stats import t_interval
from fewshot.unlabeled import with_pool

if TYPE_CHECKING:
    from fewshot.heads import Head


def align_classes(train: Features, test: Features) -> Features:
    """``test`` relabelled to ``train``'s class indices, matching classes by name.

    TEST must be fully labelled, and every class it contains must exist in TRAIN (a head cannot predict a
    class it never saw). TRAIN classes missing from TEST are fine: they are simply never the true label.
    """
    labels = np.asarray(test.labels)
    unlabeled = int((labels < 0).sum())
    if unlabeled:
        raise FewshotError(
            f"TEST has {unlabeled} unlabeled image(s) (e.g. {test.paths[int(np.flatnonzero(labels < 0)[0])]}); "
            f"evaluation needs a labelled TEST split: put every image in a class folder"
        )
    present = [test.classes[c] for c in np.unique(labels)]
    index = {name: i for i, name in enumerate(train.classes)}
    unknown = [name for name in present if name not in index]
    if unknown:
        raise FewshotError(
            f"TEST class(es) not in TRAIN: {', '.join(unknown)}; add labelled TRAIN images for them or remove "
            f"them from TEST (TRAIN classes: {', '.join(train.classes)})"
        )
    mapping = np.array([index.get(name, -1) for name in test.classes], dtype=np.int64)
    return dataclasses.replace(test, labels=mapping[labels], classes=list(train.classes))


def scores(confusion: np.ndarray) -> tuple[float, float]:
    """Accuracy and balanced accuracy (mean recall over the classes present in TEST) from a confusion matrix."""
    support = confusion.sum(axis=1)
    accuracy = float(np.trace(confusion) / confusion.sum())
    present = support > 0
    balanced = float(np.mean(np.diag(confusion)[present] / support[present]))
    return accuracy, balanced


def run_episodes(
    feats: dict[str, tuple[Features, Features]],
    cfg: Config,
    progress: bool = True,
    unlabeled: dict[str, Features] | None = None,
) -> list[dict]:
    """Score every backbone × selection strategy × head × shot count over seeded supports; one dict per
    configuration.

    ``feats`` maps a backbone name to its (TRAIN, TEST) features; all backbones must hold the same TRAIN
    images in the same order so that they can share supports. ``unlabeled`` maps a backbone to the features of
    the extra unlabeled pool (``--unlabeled``), used by pool heads with TRAIN's images outside the support. Each
    dict holds ``backbone``, ``head``, ``select``, ``shots``, ``seeds``, ``accuracy``, ``accuracy_ci95``,
    ``balanced_accuracy``, ``balanced_accuracy_ci95``, ``classes_covered``, ``pool_size``, ``per_seed`` and
    ``confusion`` (rows true, columns predicted, summed over seeds). Full-label k-NN rows
    (``cfg.evaluate.full_knn``) have ``shots`` None and one seed.
    """
    from fewshot.heads import make_head
    from fewshot.progress import bar as progress_bar

    ev = cfg.evaluate
    check_evaluate_config(cfg)
    if not feats:
        raise FewshotError("no backbones to evaluate; pass at least one, e.g. --backbone pixels")
    pairs = {name: (train, align_classes(train, test)) for name, (train, test) in feats.items()}
    (first, (train0, test0)), *others = pairs.items()
    if not train0.classes or not (np.asarray(train0.labels) >= 0).any():
        raise FewshotError("TRAIN has no labelled images; evaluation needs TRAIN in class folders (ImageFolder)")
    if len(test0.labels) == 0:
        raise FewshotError("TEST has no readable images; point it at a labelled image folder")
    for name, (train, _) in others:
        if train.classes != train0.classes or not np.array_equal(train.labels, train0.labels):
            raise FewshotError(
                f"backbones '{first}' and '{name}' hold different TRAIN images; extract both from the same "
                f"data (clear the feature cache if the folder changed)"
            )
    classes = list(train0.classes)
    shots_list = sorted(set(ev.shots))
    seeds = [ev.seed + i for i in range(ev.seeds)]
    strategies = list(dict.fromkeys(ev.select))
    # Drawn once, before any fitting: every backbone and head sees exactly these supports (paired comparison),
    # and a class with too few images fails here rather than after minutes of work.
    balanced = {(k, s): sample_support(train0.labels, k, seed=s, classes=classes) for k in shots_list for s in seeds}

    total = len(pairs) * (len(strategies) * len(ev.heads) * len(shots_list) * len(seeds) + int(ev.full_knn))
    rows: list[dict] = []
    with progress_bar(total=total, desc="episodes", unit="fit", disable=not progress) as bar:
        for backbone, (train, test) in pairs.items():
            x_train = np.asarray(train.features, dtype=np.float32)  # (N_train, D)
            y_train = np.asarray(train.labels, dtype=np.int64)  # (N_train,)
            x_test = np.asarray(test.features, dtype=np.float32)  # (N_test, D)
            y_test = np.asarray(test.labels, dtype=np.int64)  # (N_test,)
            x_extra = None if not unlabeled else np.asarray(unlabeled[backbone].features, dtype=np.float32)
            for strategy in strategies:
                for k in shots_list:
                    # one support per seed, shared by every head: random is the class-balanced draw; a strategy
                    # picks k x classes images from this backbone's TRAIN features without their labels
                    supports = {
                        s: balanced[(k, s)]
                        if strategy == "random"
                        else chosen_support(x_train, y_train, k, s, strategy, cfg)
                        for s in seeds
                    }
                    for head in ev.heads:
                        bar.set_postfix_str(f"{backbone} {strategy} {head} {k}-shot")
                        per_seed, confusion = [], np.zeros((len(classes), len(classes)), dtype=np.int64)
                        for s in seeds:
                            model = make_head(head, cfg.heads, random_state=s)
                            scored, cm = _episode(
                                model, x_train, y_train, supports[s], x_extra, x_test, y_test, len(classes), cfg, s
                            )
                            per_seed.append({"seed": s, **scored})
                            confusion += cm
                            bar.update()
                        rows.append(_row(backbone, head, k, per_seed, confusion, select=strategy))
                        # a strategy with little randomness (ProbCover) gives few distinct supports: say so
                        rows[-1]["distinct_supports"] = len({tuple(v) for v in supports.values()})
            if ev.full_knn:
                labelled = y_train >= 0
                model = make_head("knn", cfg.heads, random_state=ev.seed).fit(x_train[labelled], y_train[labelled])
                cm = confusion_counts(y_test, model.predict(x_test), len(classes))
                acc, bal = scores(cm)
                rows.append(
                    _row(backbone, "knn", None, [{"seed": ev.seed, "accuracy": acc, "balanced_accuracy": bal}], cm)
                )
                bar.update()
    return rows


def _episode(
    model: Head,
    x_train: np.ndarray,
    y_train: np.ndarray,
    support: np.ndarray,
    x_extra: np.ndarray | None,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    cfg: Config,
    seed: int,
) -> tuple[dict, np.ndarray]:
    """Fit ``model`` on the support (and, for a pool head, the pool) and score it on TEST: the per-seed scores and
    the confusion matrix."""
    X, y = x_train[support], y_train[support]
    if getattr(model, "uses_pool", False):
        X, y = with_pool(x_train, y_train, support, x_extra, cfg.pool.max_images, seed)
    covered = np.unique(y_train[support])
    # a selection that found a single class can only predict that class
    pred = np.full(len(y_test), covered[0]) if len(covered) < 2 else model.fit(X, y).predict(x_test)
    cm = confusion_counts(y_test, pred, n_classes)
    acc, bal = scores(cm)
    return {
        "accuracy": acc,
        "balanced_accuracy": bal,
        "classes_covered": len(covered),
        "pool_size": int((y < 0).sum()),
    }, cm


def chosen_support(
    x_train: np.ndarray, y_train: np.ndarray, shots: int, seed: int, strategy: str, cfg: Config
) -> np.ndarray:
    """Sorted TRAIN rows that ``strategy`` picks for a budget of ``shots`` x classes, from the labelled rows'
    features alone (their labels are revealed only after the pick). ``uniform`` is a seeded uniform draw of that
    many images: what a person without labels gets from random picks (``random`` is the class-balanced draw)."""
    from fewshot.selection import select

    labelled = np.flatnonzero(y_train >= 0)
    n_classes = int(y_train.max()) + 1
    strategy = "random" if strategy == "uniform" else strategy  # selection's own random: uniform, label-blind
    picked = select(x_train[labelled], shots * n_classes, strategy, seed=seed, n_classes=n_classes, cfg=cfg.select)
    return np.sort(labelled[picked.indices])


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """(n, n) counts, rows true class, columns predicted class."""
    return np.bincount(y_true * n + np.asarray(y_pred, dtype=np.int64), minlength=n * n).reshape(n, n)


def _row(
    backbone: str, head: str, shots: int | None, per_seed: list[dict], confusion: np.ndarray, select: str = "random"
) -> dict:
    acc, acc_ci = t_interval([p["accuracy"] for p in per_seed])
    bal, bal_ci = t_interval([p["balanced_accuracy"] for p in per_seed])
    covered = [p["classes_covered"] for p in per_seed if "classes_covered" in p]
    return {
        "backbone": backbone,
        "head": head,
        "select": select,
        "shots": shots,
        "seeds": len(per_seed),
        "accuracy": acc,
        "accuracy_ci95": acc_ci,
        "balanced_accuracy": bal,
        "balanced_accuracy_ci95": bal_ci,
        "classes_covered": float(np.mean(covered)) if covered else None,
        "pool_size": float(np.mean([p.get("pool_size", 0) for p in per_seed])),
        "per_seed": per_seed,
        "confusion": confusion.tolist(),
    }


def check_evaluate_config(cfg: Config) -> None:
    """Fail fast (before any feature extraction) on an evaluate section that cannot run."""
    from fewshot.heads import HEADS, check_head_name

    ev = cfg.evaluate
    if not ev.backbones:
        raise FewshotError("evaluate.backbones is empty; pass at least one, e.g. --backbone pixels")
    if not ev.heads:
        raise FewshotError(f"evaluate.heads is empty; choose from: {', '.join(HEADS)}")
    for head in (*ev.heads, *([ev.reference_head] if ev.reference_head else [])):
        check_head_name(head)  # the heads' hyperparameters were checked when cfg.heads was built
    if ev.reference_head and ev.reference_head not in ev.heads:
        raise FewshotError(f"evaluate.reference_head '{ev.reference_head}' is not among the heads; add it to --heads")
    if ev.full_knn and "knn" not in HEADS:
        raise FewshotError("evaluate.full_knn needs the 'knn' head; set evaluate.full_knn=false")
    if ev.reference is not None and ev.reference not in ev.backbones:
        raise FewshotError(
            f"--reference '{ev.reference}' is not one of the backbones ({', '.join(ev.backbones)}); add it with -b"
        )
