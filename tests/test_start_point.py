"""Start-point accounting: best.safetensors from step 0 on, one warning naming the settings when the monitored
accuracy falls below the start, start → best → end, and a resumed run picking it all up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import zeros

from fewshot.start_point import StartPoint


def tracker(tmp_path: Path, saved: list[tuple[Path, dict]]) -> StartPoint:
    def save(path: Path, extra: dict[str, Any]) -> None:
        saved.append((path, extra))
        save_file({"w": zeros(1)}, str(path), metadata={k: json.dumps(v) for k, v in extra.items()})

    return StartPoint(tmp_path / "best.safetensors", 0.02, lambda: "lower adapt.backbone_lr_scale (now 0.1)", save)


def test_best_starts_at_step_0_and_only_improvements_replace_it(tmp_path: Path) -> None:
    saved: list[tuple[Path, dict]] = []
    sp = tracker(tmp_path, saved)
    assert sp.observe(0, 0.70, "train") == [] and [e["step"] for _, e in saved] == [0]  # the start is the first best
    assert sp.observe(10, 0.69) == [] and len(saved) == 1  # within the margin: no warning, no new best
    assert sp.observe(20, 0.75) == [] and saved[-1][1] == {"step": 20, "knn_top1": 0.75, "monitor": None}
    assert sp.observe(30, 0.72) == []
    assert sp.summary() == "k-NN top-1 start 0.700 → best 0.750 (step 20, best.safetensors) → end 0.720"
    assert sp.as_dict()["best"] == {"knn_top1": 0.75, "step": 20} and sp.final_warnings() == []


def test_falling_below_the_start_warns_once_naming_the_settings(tmp_path: Path) -> None:
    sp = tracker(tmp_path, [])
    sp.observe(0, 0.70)
    first = sp.observe(10, 0.60)
    assert len(first) == 1 and "0.100 below the start 0.700" in first[0]
    assert "adapt.backbone_lr_scale (now 0.1)" in first[0] and "best.safetensors keeps" in first[0]
    assert sp.observe(20, 0.55) == []  # still below: said once, not every epoch
    assert len(sp.final_warnings()) == 1  # and again at the end when the run ends below
    sp.observe(30, 0.69)
    assert sp.final_warnings() == []
    assert sp.observe(40, 0.5) != []  # a new fall is a new warning


def test_a_resumed_run_picks_up_start_best_and_end(tmp_path: Path) -> None:
    sp = tracker(tmp_path, [])
    sp.observe(0, 0.70)
    sp.observe(10, 0.80)
    records = [
        {"kind": "start", "step": 0, "knn_top1": 0.70, "monitor": "train"},
        {"kind": "step", "step": 5, "loss": 1.0},
        {"kind": "epoch", "step": 10, "knn_top1": 0.80},
    ]
    again = tracker(tmp_path, [])
    again.resume(records, "train")
    assert (again.start, again.best, again.end) == (0.70, (0.80, 10), (0.80, 10))
    other = tracker(tmp_path, [])
    other.resume(records, "another/set")  # another monitor set: its start is not comparable
    assert other.start is None and other.summary().startswith("k-NN top-1 start ?")
