"""probe -> saved head -> predict on new images, through the Python API."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fewshot.config import build_config
from fewshot.errors import FewshotError
from fewshot.probing import predict, probe


@pytest.mark.parametrize("head", ["knn", "logreg", "prototype", "linear"])
def test_probe_then_predict(digits: tuple[Path, Path], tmp_path: Path, head: str) -> None:
    train, test = digits
    cfg = build_config(sets=[f"probe.head={head}", "probe.shots=5", "extract.backbone=pixels:8"])
    summary = probe(train, tmp_path / "head", test=test, cfg=cfg, progress=False)
    assert summary.support_size == 20 and summary.test_size == 24
    assert summary.accuracy is not None and summary.accuracy > 0.5  # 4 digit classes, raw pixels: chance is 0.25
    info = json.loads((tmp_path / "head" / "head.json").read_text())
    assert info["info"]["extract"]["backbone"] == "pixels:8"
    assert (tmp_path / "head" / "config.json").is_file()

    result = predict(test, tmp_path / "head", tmp_path / "pred.csv", progress=False)
    with open(tmp_path / "pred.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [p["path"] for p in result.rows]
    labels = np.array([r["label"] for r in rows])
    truth = np.array([Path(r["path"]).parent.name for r in rows])
    assert np.mean(labels == truth) == pytest.approx(summary.accuracy)
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)


def test_same_seed_same_support(digits: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = build_config(sets=["probe.shots=2", "probe.seed=4", "extract.backbone=pixels:8", "probe.head=prototype"])
    a = probe(digits[0], tmp_path / "a", test=digits[1], cfg=cfg, progress=False)
    b = probe(digits[0], tmp_path / "b", test=digits[1], cfg=cfg, progress=False)
    assert a.accuracy == b.accuracy


def test_too_many_shots_names_the_class(digits: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = build_config(sets=["probe.shots=11", "extract.backbone=pixels:8"])
    with pytest.raises(FewshotError, match="class '0' has 10 labelled image"):
        probe(digits[0], tmp_path / "h", cfg=cfg, progress=False)


def test_predict_needs_a_head(tmp_path: Path, digits: tuple[Path, Path]) -> None:
    with pytest.raises(FewshotError):
        predict(digits[1], tmp_path / "no-head", tmp_path / "p.csv", progress=False)
