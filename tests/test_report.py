"""Evaluation artifacts: report.json keys, the markdown table and best configuration, a real PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fewshot.config import Config, EvaluateConfig
from fewshot.evaluation import build_report
from fewshot.features import Features
from fewshot.report import write_report

CLASSES = ["ant", "bee|wasp", "cat"]  # a pipe must not break the markdown table


def row(backbone, head, shots, acc, ci, confusion, seeds=3):
    per_seed = [{"seed": s, "accuracy": acc, "balanced_accuracy": acc} for s in range(seeds)]
    return {
        "backbone": backbone,
        "head": head,
        "shots": shots,
        "seeds": seeds,
        "accuracy": acc,
        "accuracy_ci95": ci,
        "balanced_accuracy": acc,
        "balanced_accuracy_ci95": ci,
        "per_seed": per_seed,
        "confusion": confusion,
    }


@pytest.fixture
def report():
    labels = np.array([0, 0, 1, 1, 2, 2])
    train = Features(np.zeros((6, 4), np.float32), labels, CLASSES, [f"{i}.png" for i in range(6)])
    test = Features(
        np.zeros((4, 4), np.float32), np.array([0, 1, 2, 2]), CLASSES, ["a", "b", "c", "d"],
        skipped=[{"path": "cat/broken.jpg", "reason": "cannot identify image file"}],
    )  # fmt: skip
    good = [[3, 0, 0], [0, 2, 1], [0, 0, 6]]  # summed over 3 seeds: 11/12 right
    rows = [
        row("dino", "knn", 1, 0.5, 0.1, good),
        row("dino", "knn", 2, 0.75, 0.05, good),
        row("dino", "logreg", 1, 0.6, 0.1, good),
        row("dino", "logreg", 2, 0.917, 0.025, good),
        row("pixels", "knn", 1, 0.3, 0.2, good),
        row("pixels", "knn", 2, 0.4, 0.1, good),
        row("pixels", "logreg", 1, 0.35, 0.2, good),
        row("pixels", "logreg", 2, 0.45, 0.1, good),
        row("dino", "knn", None, 0.95, 0.0, good, seeds=1),
        row("pixels", "knn", None, 0.5, 0.0, good, seeds=1),
    ]
    cfg = Config(evaluate=EvaluateConfig(backbones=("dino", "pixels"), shots=(1, 2), seeds=3, heads=("knn", "logreg")))
    return build_report(rows, {"dino": (train, test), "pixels": (train, test)}, cfg)


def test_report_json_has_required_keys(report, tmp_path):
    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("results", "full_knn", "classes", "skipped", "best"):
        assert key in saved, key
    required = {"backbone", "head", "shots", "seeds", "accuracy", "accuracy_ci95", "balanced_accuracy"}
    for r in saved["results"]:
        assert required | {"balanced_accuracy_ci95", "per_seed"} <= set(r)
    assert len(saved["results"]) == 8 and all(r["shots"] is not None for r in saved["results"])
    best = saved["best"]
    assert (best["backbone"], best["head"], best["shots"]) == ("dino", "logreg", 2)  # top mean at most shots
    assert best["per_class_accuracy"] == {"ant": 1.0, "bee|wasp": pytest.approx(2 / 3), "cat": 1.0}
    assert saved["skipped"] == [{"split": "test", "path": "cat/broken.jpg", "reason": "cannot identify image file"}]


def test_report_md_has_the_accuracy_table_and_best_configuration(report, tmp_path):
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| backbone | head | 1-shot | 2-shot |" in md
    assert "| dino | logreg | 60.0 ± 10.0 | 91.7 ± 2.5 |" in md
    assert "| pixels | knn | 30.0 ± 20.0 | 40.0 ± 10.0 |" in md
    assert "| dino | 6 | 95.0 | 95.0 |" in md  # full-label k-NN: backbone, labels, acc, balanced acc
    assert "dino + logreg, 2-shot" in md
    assert "| bee\\|wasp | 1 | 66.7 |" in md  # per-class accuracy, pipe escaped
    assert "| bee\\|wasp | 0 | 2 | 1 |" in md  # confusion row
    assert "cat/broken.jpg" in md


def test_label_efficiency_png_is_a_valid_image(report, tmp_path):
    write_report(report, tmp_path)
    png = tmp_path / "label_efficiency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()
        assert img.size[0] > 300 and img.size[1] > 200
