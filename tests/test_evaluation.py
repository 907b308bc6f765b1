"""Few-shot evaluation protocol: shared balanced supports, t-intervals, determinism, and the evaluate API."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from fewshot.config import Config, EvaluateConfig, HeadsConfig, LogRegConfig
from fewshot.episodes import align_classes, run_episodes
from fewshot.errors import FewshotError
from fewshot.evaluation import evaluate
from fewshot.features import Features
from fewshot.sampling import sample_support

CLASSES = ["ant", "bee", "cat", "dog", "eel"]


def blobs(n_per_class: int, dim: int = 8, spread: float = 0.3, seed: int = 0, classes=CLASSES) -> Features:
    """Gaussian blobs around fixed class centres: linearly separable when spread is small."""
    centres = np.random.default_rng(123).normal(size=(len(classes), dim)) * 3  # same centres for TRAIN and TEST
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), n_per_class)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    paths = [f"{classes[c]}/{i}.png" for i, c in enumerate(labels)]
    return Features(x.astype(np.float32), labels.astype(np.int64), list(classes), paths)


def noise_like(f: Features, seed: int = 1) -> Features:
    rng = np.random.default_rng(seed)
    return dataclasses.replace(f, features=rng.normal(size=f.features.shape).astype(np.float32))


def record_fits(monkeypatch: pytest.MonkeyPatch, record: list) -> None:
    """The real heads, each fit also recorded (head, seed, column 0 of its rows, labels)."""
    import fewshot.heads

    real = fewshot.heads.make_head

    def make_head(name, cfg, random_state=None):
        head = real(name, cfg, random_state=random_state)
        fit = head.fit

        def recorded(x, y):
            record.append({"head": name, "seed": random_state, "x0": x[:, 0].copy(), "y": y.copy()})
            return fit(x, y)

        head.fit = recorded
        return head

    monkeypatch.setattr(fewshot.heads, "make_head", make_head)


def config(**evaluate) -> Config:
    # a short C grid keeps logistic regression's cross-validation fast; the protocol is the same
    heads = HeadsConfig(logreg=LogRegConfig(c_grid=(0.1, 10.0), cv_folds=2))
    return Config(heads=heads, evaluate=EvaluateConfig(**evaluate))


def test_supports_are_balanced_and_shared_across_backbones_and_heads(monkeypatch):
    record: list = []
    record_fits(monkeypatch, record)
    train, test = blobs(10), blobs(4, seed=9)
    # column 0 holds the TRAIN row index in both backbones, so a fit reveals which rows formed its support
    ids = np.arange(len(train.labels), dtype=np.float32)
    a = dataclasses.replace(train, features=np.c_[ids, train.features])
    b = dataclasses.replace(train, features=np.c_[ids, noise_like(train).features])
    feats = {"a": (a, dataclasses.replace(test, features=np.c_[np.zeros(20), test.features])), "b": (b, test)}
    feats["b"] = (b, dataclasses.replace(test, features=np.c_[np.zeros(20), noise_like(test).features]))
    cfg = config(shots=(1, 3), seeds=3, seed=7, heads=("knn", "prototype"), full_knn=False)
    run_episodes(feats, cfg, progress=False)

    assert len(record) == 2 * 2 * 2 * 3  # backbones × heads × shots × seeds
    for shots in (1, 3):
        drawn = []
        for seed in (7, 8, 9):
            fits = [r for r in record if r["seed"] == seed and len(r["y"]) == shots * len(CLASSES)]
            assert len(fits) == 4  # 2 backbones × 2 heads
            expected = sample_support(train.labels, shots, seed=seed, classes=CLASSES)
            for fit in fits:
                np.testing.assert_array_equal(fit["x0"].astype(int), expected)
                assert np.bincount(fit["y"], minlength=len(CLASSES)).tolist() == [shots] * len(CLASSES)
            drawn.append(tuple(expected))
        assert len(set(drawn)) == 3  # different seeds draw different supports


def test_episode_rows_carry_t_intervals_of_their_per_seed_values():
    train, test = blobs(6, spread=2.0), blobs(6, spread=2.0, seed=5)
    rows = run_episodes({"x": (train, test)}, config(shots=(2,), seeds=5, heads=("prototype",)), progress=False)
    row = next(r for r in rows if r["shots"] == 2)
    accs = np.array([p["accuracy"] for p in row["per_seed"]])
    assert row["seeds"] == len(accs) == 5
    assert row["accuracy"] == pytest.approx(accs.mean())
    assert row["accuracy_ci95"] == pytest.approx(2.776445 * accs.std(ddof=1) / math.sqrt(5), rel=1e-5)  # t_{.975,4}
    assert np.asarray(row["confusion"]).sum() == 5 * len(test.labels)  # summed over seeds
    full = [r for r in rows if r["shots"] is None]
    assert [(r["backbone"], r["head"], r["seeds"], r["accuracy_ci95"]) for r in full] == [("x", "knn", 1, 0.0)]


def test_same_seed_gives_identical_numbers():
    feats = {"blobs": (blobs(10, spread=2.0), blobs(5, spread=2.0, seed=3))}
    cfg = config(shots=(1, 5), seeds=2)
    first = run_episodes(feats, cfg, progress=False)
    assert run_episodes(feats, cfg, progress=False) == first
    other = run_episodes(feats, dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, seed=50)), False)
    assert [r["per_seed"] for r in other] != [r["per_seed"] for r in first]


def test_separable_backbone_beats_noise_backbone():
    train, test = blobs(12), blobs(8, seed=4)
    feats = {"separable": (train, test), "noise": (noise_like(train), noise_like(test, seed=2))}
    rows = run_episodes(feats, config(shots=(1, 5), seeds=2), progress=False)
    for r in rows:
        if r["backbone"] == "separable":
            assert r["accuracy"] > 0.9, r
        else:
            assert r["accuracy"] < 0.5, r  # chance is 0.2


def test_align_classes_maps_by_name_and_rejects_unknown_or_unlabeled():
    train = blobs(2)
    test = Features(np.zeros((3, 8), np.float32), np.array([0, 1, 0]), ["dog", "ant"], ["a", "b", "c"])
    aligned = align_classes(train, test)
    assert aligned.classes == CLASSES and aligned.labels.tolist() == [3, 0, 3]

    unknown = Features(np.zeros((2, 8), np.float32), np.array([0, 1]), ["dog", "yak"], ["a", "b"])
    with pytest.raises(FewshotError, match="yak"):
        align_classes(train, unknown)
    unlabeled = dataclasses.replace(test, labels=np.array([0, -1, 1]))
    with pytest.raises(FewshotError, match="unlabeled"):
        align_classes(train, unlabeled)


def test_unknown_head_fails_before_any_work():
    with pytest.raises(FewshotError, match="unknown head"):
        run_episodes({"x": (blobs(3), blobs(2))}, config(heads=("nope",)), progress=False)


def test_evaluate_extracts_once_per_backbone_and_writes_artifacts(monkeypatch, tmp_path):
    import fewshot.features
    import fewshot.leakage

    calls = []

    def fake_extract(source, cfg, progress=True):
        calls.append((source, cfg.backbone))
        f = blobs(10, seed=0) if source == "TRAIN" else blobs(5, seed=1)
        if cfg.backbone == "noise":
            f = noise_like(f)
        return dataclasses.replace(f, skipped=[{"path": f"{source}/broken.jpg", "reason": "cannot identify image"}])

    monkeypatch.setattr(fewshot.features, "extract_features", fake_extract, raising=False)
    monkeypatch.setattr(fewshot.leakage, "check_sources", lambda *args, **kwargs: [])  # no files behind the names
    cfg = config(shots=(1, 2), seeds=2, heads=("knn", "prototype"))
    report = evaluate("TRAIN", "TEST", backbones=["blobs", "noise"], cfg=cfg, out=tmp_path, progress=False)

    assert sorted(calls) == sorted([("TRAIN", "blobs"), ("TEST", "blobs"), ("TRAIN", "noise"), ("TEST", "noise")])
    assert report["best"]["backbone"] == "blobs" and report["best"]["shots"] == 2
    assert report["skipped_count"] == 2 and {s["split"] for s in report["skipped"]} == {"train", "test"}
    assert len(report["results"]) == 2 * 2 * 2 and len(report["full_knn"]) == 2
    for name in ("report.json", "report.md", "label_efficiency.png", "config.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["evaluate"]["backbones"] == ["blobs", "noise"]  # the override is what was run


def test_selection_strategies_pick_per_backbone_and_report_coverage():
    train, test = blobs(12, spread=0.5), blobs(4, seed=6)
    strategies = ("random", "uniform", "typiclust")
    cfg = config(shots=(1, 2), seeds=3, heads=("prototype",), select=strategies, full_knn=False)
    rows = run_episodes({"x": (train, test)}, cfg, progress=False)
    assert {(r["select"], r["shots"]) for r in rows} == {(s, k) for s in strategies for k in (1, 2)}
    for r in rows:
        assert all(1 <= p["classes_covered"] <= len(CLASSES) for p in r["per_seed"])
        if r["select"] == "random":
            assert r["classes_covered"] == len(CLASSES)  # the class-balanced draw covers every class
    typi = next(r for r in rows if r["select"] == "typiclust" and r["shots"] == 1)
    assert typi["classes_covered"] == len(CLASSES)  # well-separated blobs: one typical image per blob
    uniform = next(r for r in rows if r["select"] == "uniform" and r["shots"] == 1)
    assert uniform["classes_covered"] < len(CLASSES)  # 5 label-blind picks from 5 classes rarely hit all 5
    assert uniform["distinct_supports"] == 3


def test_pool_heads_get_train_outside_the_support_and_the_extra_pool():
    train, test = blobs(8, spread=0.5), blobs(4, seed=6)
    extra = blobs(3, seed=11)
    cfg = config(shots=(2,), seeds=2, heads=("spread", "logreg+center", "knn"), full_knn=False)
    rows = run_episodes({"x": (train, test)}, cfg, progress=False, unlabeled={"x": extra})
    sizes = {r["head"]: r["pool_size"] for r in rows}
    assert sizes == {"spread": 40 - 10 + 15, "logreg+center": 40 - 10 + 15, "knn": 0}
    assert all(r["accuracy"] > 0.9 for r in rows)
    capped = dataclasses.replace(cfg, pool=dataclasses.replace(cfg.pool, max_images=12))
    rows = run_episodes({"x": (train, test)}, capped, progress=False, unlabeled={"x": extra})
    assert {r["head"]: r["pool_size"] for r in rows} == {"spread": 12, "logreg+center": 12, "knn": 0}


def test_report_leads_with_paired_differences_against_pixels(monkeypatch, tmp_path):
    import fewshot.features
    import fewshot.leakage

    def fake_extract(source, cfg, progress=True):
        f = blobs(10, seed=0) if source == "TRAIN" else blobs(5, seed=1)
        return noise_like(f) if cfg.backbone == "pixels" else f

    monkeypatch.setattr(fewshot.features, "extract_features", fake_extract, raising=False)
    monkeypatch.setattr(fewshot.leakage, "check_sources", lambda *args, **kwargs: [])
    cfg = config(shots=(1, 2), seeds=3, heads=("knn", "prototype"))
    report = evaluate("TRAIN", "TEST", backbones=["runs/good", "pixels"], cfg=cfg, out=tmp_path, progress=False)
    assert report["references"] == {"runs/good": "pixels"}
    assert {(c["backbone"], c["head"], c["shots"]) for c in report["comparisons"]} == {
        ("runs/good", h, k) for h in ("knn", "prototype") for k in (1, 2)
    }
    assert report["headline"] and report["headline"][0].startswith("runs/good beats pixels by +")
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Paired differences") < md.index("## Accuracy (%)")
    assert (tmp_path / "paired_differences.png").is_file()
    again = evaluate(
        "TRAIN", "TEST", cfg=cfg, backbones=["runs/good", "pixels"], progress=False, references={"pixels": "runs/good"}
    )
    assert {c["backbone"] for c in again["comparisons"]} == {"runs/good", "pixels"}  # extra pairs are added
