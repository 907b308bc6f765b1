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
from pathlib import Path

import numpy as np

from fewshot.config import Config
from fewshot.errors import FewshotError
from fewshot.features import Features
from fewshot.sampling import sample_support
from fewshot.stats import t_interval


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


def run_episodes(feats: dict[str, tuple[Features, Features]], cfg: Config, progress: bool = True) -> list[dict]:
    """Score every backbone × head × shot count over seeded supports; one dict per configuration.

    ``feats`` maps a backbone name to its (TRAIN, TEST) features; all backbones must hold the same TRAIN
    images in the same order so that they can share supports. Each dict holds ``backbone``, ``head``,
    ``shots``, ``seeds``, ``accuracy``, ``accuracy_ci95``, ``balanced_accuracy``, ``balanced_accuracy_ci95``,
    ``per_seed`` and ``confusion`` (rows true, columns predicted, summed over seeds). Full-label k-NN rows
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
    # Drawn once, before any fitting: every backbone and head sees exactly these supports (paired comparison),
    # and a class with too few images fails here rather than after minutes of work.
    supports = {(k, s): sample_support(train0.labels, k, seed=s, classes=classes) for k in shots_list for s in seeds}

    total = len(pairs) * (len(ev.heads) * len(shots_list) * len(seeds) + int(ev.full_knn))
    rows: list[dict] = []
    with progress_bar(total=total, desc="episodes", unit="fit", disable=not progress) as bar:
        for backbone, (train, test) in pairs.items():
            x_train = np.asarray(train.features, dtype=np.float32)  # (N_train, D)
            y_train = np.asarray(train.labels, dtype=np.int64)  # (N_train,)
            x_test = np.asarray(test.features, dtype=np.float32)  # (N_test, D)
            y_test = np.asarray(test.labels, dtype=np.int64)  # (N_test,)
            for head in ev.heads:
                for k in shots_list:
                    bar.set_postfix_str(f"{backbone} {head} {k}-shot")
                    per_seed, confusion = [], np.zeros((len(classes), len(classes)), dtype=np.int64)
                    for s in seeds:
                        idx = supports[(k, s)]
                        model = make_head(head, cfg.heads, random_state=s).fit(x_train[idx], y_train[idx])
                        cm = _confusion(y_test, model.predict(x_test), len(classes))
                        acc, bal = scores(cm)
                        per_seed.append({"seed": s, "accuracy": acc, "balanced_accuracy": bal})
                        confusion += cm
                        bar.update()
                    rows.append(_row(backbone, head, k, per_seed, confusion))
            if ev.full_knn:
                labelled = y_train >= 0
                model = make_head("knn", cfg.heads, random_state=ev.seed).fit(x_train[labelled], y_train[labelled])
                cm = _confusion(y_test, model.predict(x_test), len(classes))
                acc, bal = scores(cm)
                rows.append(
                    _row(backbone, "knn", None, [{"seed": ev.seed, "accuracy": acc, "balanced_accuracy": bal}], cm)
                )
                bar.update()
    return rows


def check_evaluate_config(cfg: Config) -> None:
    """Fail fast (before any feature extraction) on an evaluate section that cannot run."""
    from fewshot.heads import HEADS

    ev = cfg.evaluate
    if not ev.backbones:
        raise FewshotError("evaluate.backbones is empty; pass at least one, e.g. --backbone pixels")
    if not ev.heads:
        raise FewshotError(f"evaluate.heads is empty; choose from: {', '.join(HEADS)}")
    unknown = [h for h in ev.heads if h not in HEADS]
    if unknown:
        raise FewshotError(f"unknown head(s) {', '.join(unknown)} in evaluate.heads; choose from: {', '.join(HEADS)}")
    if ev.full_knn and "knn" not in HEADS:
        raise FewshotError("evaluate.full_knn needs the 'knn' head; set evaluate.full_knn=false")
    if not ev.shots or min(ev.shots) < 1:
        raise FewshotError(f"evaluate.shots must be positive integers, got {list(ev.shots)}; e.g. --shots 1,2,5,10")
    if ev.seeds < 1:
        raise FewshotError(f"evaluate.seeds must be at least 1, got {ev.seeds}")


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """(n, n) counts, rows true class, columns predicted class."""
    return np.bincount(y_true * n + np.asarray(y_pred, dtype=np.int64), minlength=n * n).reshape(n, n)


def _row(backbone: str, head: str, shots: int | None, per_seed: list[dict], confusion: np.ndarray) -> dict:
    acc, acc_ci = t_interval([p["accuracy"] for p in per_seed])
    bal, bal_ci = t_interval([p["balanced_accuracy"] for p in per_seed])
    return {
        "backbone": backbone,
        "head": head,
        "shots": shots,
        "seeds": len(per_seed),
        "accuracy": acc,
        "accuracy_ci95": acc_ci,
        "balanced_accuracy": bal,
        "balanced_accuracy_ci95": bal_ci,
        "per_seed": per_seed,
        "confusion": confusion.tolist(),
    }


def build_report(rows: list[dict], feats: dict[str, tuple[Features, Features]], cfg: Config) -> dict:
    """The report dict (what ``report.json`` holds) from :func:`run_episodes` rows and the features used."""
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
    for split, index in (("train", 0), ("test", 1)):
        seen = set()
        for pair in feats.values():  # every backbone reads the same files; list each skipped file once
            for item in pair[index].skipped:
                if item.get("path") not in seen:
                    seen.add(item.get("path"))
                    skipped.append({"split": split, **item})
    return {
        "classes": classes,
        "train_images": len(train.labels),
        "test_images": len(test.labels),
        "test_per_class": np.bincount(align_classes(train, test).labels, minlength=len(classes)).tolist(),
        "backbones": list(feats),
        "heads": list(cfg.evaluate.heads),
        "shots": sorted(set(cfg.evaluate.shots)),
        "seeds": cfg.evaluate.seeds,
        "results": [{k: v for k, v in r.items() if k != "confusion"} for r in results],
        "full_knn": full_knn,
        "best": best,
        "skipped": skipped,
        "skipped_count": len(skipped),
    }


def evaluate(
    train: str | Path,
    test: str | Path,
    backbones: list[str] | None = None,
    cfg: Config | None = None,
    out: Path | None = None,
    progress: bool = True,
) -> dict:
    """Few-shot label-efficiency evaluation of ``backbones`` on a labelled TRAIN/TEST pair; returns the report.

    ``train`` and ``test`` are data sources as :func:`fewshot.features.extract_features` accepts them
    (e.g. ImageFolder directories). ``backbones`` overrides ``cfg.evaluate.backbones``. With ``out``, writes
    ``report.json``, ``report.md``, ``label_efficiency.png`` and the resolved ``config.json`` there.
    """
    from fewshot.config import save_config
    from fewshot.features import extract_features
    from fewshot.report import write_report

    cfg = cfg if cfg is not None else Config()
    if isinstance(backbones, str):
        backbones = [backbones]
    if backbones:
        cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, backbones=tuple(backbones)))
    check_evaluate_config(cfg)
    feats: dict[str, tuple[Features, Features]] = {}
    for spec in dict.fromkeys(cfg.evaluate.backbones):  # de-duplicated, order kept
        extract_cfg = dataclasses.replace(cfg.extract, backbone=spec)
        feats[spec] = (
            extract_features(train, extract_cfg, progress=progress),
            extract_features(test, extract_cfg, progress=progress),
        )
    report = build_report(run_episodes(feats, cfg, progress=progress), feats, cfg)
    if out is not None:
        out = Path(out)
        write_report(report, out)
        save_config(cfg, out / "config.json")
    return report
