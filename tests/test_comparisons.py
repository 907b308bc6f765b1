"""Paired comparisons between configurations: the numbers by hand, the pairing by seed, the words."""

from __future__ import annotations

import pytest

from fewshot.comparisons import all_comparisons, backbone_references, compare, headline, sentence


def row(backbone: str, head: str, accs: list[float], select: str = "random", shots: int = 5) -> dict:
    per_seed = [{"seed": s, "accuracy": a, "balanced_accuracy": a - 0.01} for s, a in enumerate(accs)]
    return {"backbone": backbone, "head": head, "select": select, "shots": shots, "per_seed": per_seed,
            "accuracy": sum(accs) / len(accs)}  # fmt: skip


def test_paired_difference_by_hand() -> None:
    rows = [row("runs/dino", "logreg", [0.62, 0.54, 0.70]), row("pixels", "logreg", [0.60, 0.50, 0.64])]
    (c,) = compare(rows, "backbone", {"runs/dino": "pixels"})
    # differences 0.02, 0.04, 0.06: mean 0.04, sd 0.02, t(0.975, 2) = 4.302653 -> half-width 0.0496827
    assert c["difference"] == pytest.approx(0.04)
    assert c["difference_ci95"] == pytest.approx(4.302653 * 0.02 / 3**0.5, rel=1e-6)
    assert (c["wins"], c["losses"], c["n"], c["significant"]) == (3, 0, 3, False)  # 0.04 < 0.0497
    assert c["balanced_difference"] == pytest.approx(0.04)
    assert (c["backbone"], c["reference"], c["head"], c["shots"], c["field"]) == ("runs/dino", "pixels", "logreg", 5,
                                                                                   "backbone")  # fmt: skip


def test_pairs_by_seed_and_only_rows_that_differ_in_one_field() -> None:
    a = row("run", "knn", [0.5, 0.6, 0.7])
    b = row("pixels", "knn", [0.4, 0.6])  # seeds 0 and 1 only
    other_head = row("pixels", "logreg", [0.1, 0.1, 0.1])
    (c,) = compare([a, b, other_head], "backbone", {"run": "pixels"})
    assert c["n"] == 2 and c["difference"] == pytest.approx(0.05)
    assert (c["wins"], c["losses"]) == (1, 0)  # a tie is neither


def test_references_default_to_pixels_and_can_be_given_per_backbone() -> None:
    assert backbone_references(["runs/a", "pixels:28", "vit"], None) == {"runs/a": "pixels:28", "vit": "pixels:28"}
    assert backbone_references(["runs/a", "vit"], None) == {}
    assert backbone_references(["runs/a", "vit"], "vit") == {"runs/a": "vit"}
    rows = [row("runs/a", "knn", [0.7, 0.8]), row("vit", "knn", [0.5, 0.6]), row("pixels", "knn", [0.6, 0.6])]
    found = all_comparisons(rows, {"runs/a": "vit", "vit": "pixels"}, ["random"], ["knn"])
    assert {(c["backbone"], c["reference"]) for c in found} == {("runs/a", "vit"), ("vit", "pixels")}


def test_strategies_compare_with_random_and_heads_with_the_reference_head() -> None:
    rows = [
        row("run", "knn", [0.5, 0.6]),
        row("run", "knn", [0.7, 0.9], select="typiclust"),
        row("run", "spread", [0.6, 0.8]),
        row("run", "spread", [0.8, 0.9], select="typiclust"),
    ]
    found = all_comparisons(rows, {}, ["random", "typiclust"], ["knn", "spread"], reference_head="knn")
    kinds = sorted((c["field"], c["select"], c["head"]) for c in found)
    assert kinds == [("head", "random", "spread"), ("head", "typiclust", "spread"),
                     ("select", "typiclust", "knn"), ("select", "typiclust", "spread")]  # fmt: skip


def test_the_report_leads_with_sentences() -> None:
    rows = [row("runs/dino", "logreg", [0.70, 0.72, 0.74, 0.71]), row("pixels", "logreg", [0.60, 0.61, 0.66, 0.60])]
    found = compare(rows, "backbone", {"runs/dino": "pixels"})
    assert sentence(found[0]).startswith("runs/dino beats pixels by +10.0 ± ")
    assert "at 5 shots (logreg; better in 4 of 4 seeds, worse in 0)" in sentence(found[0])
    assert headline(found, rows) == [sentence(found[0])]
    worse = compare(rows, "backbone", {"pixels": "runs/dino"})
    assert sentence(worse[0]).startswith("pixels trails runs/dino by 10.0 ± ")
    level = compare([row("a", "knn", [0.5, 0.6]), row("b", "knn", [0.6, 0.5])], "backbone", {"a": "b"})
    assert "is level with b (+0.0 ± " in sentence(level[0])
