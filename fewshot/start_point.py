"""Start-point accounting of a pretraining run under ``--monitor``: where the backbone started, its best, its end.

The monitored k-NN top-1 (:mod:`fewshot.monitor`, DINO's ``eval_knn``) of the backbone the run starts from -- the
``--init`` weights, or the random initialisation -- is logged as step 0 (``"kind": "start"`` in metrics.jsonl),
then every epoch. The run keeps ``best.safetensors``, the exported backbone at the best monitored point (step 0
included, so it is never worse than the start on the monitored images), beside ``backbone.safetensors`` (the last).
When the accuracy falls more than ``adapt.warn_margin`` below the start, a warning names the settings that hold
the backbone back; the summary line reads ``start → best → end``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


class StartPoint:
    """Tracks start, best and end of the monitored accuracy for one run folder.

    ``save(path, extra)`` writes the exported backbone to ``path`` with ``extra`` metadata; ``advice()`` returns
    the settings to change (see :meth:`fewshot.adapt.Guard.advice`).
    """

    def __init__(self, best_path: Path, margin: float, advice: Callable[[], str], save: Callable[..., None]) -> None:
        self.best_path, self.margin, self.advice, self.save = Path(best_path), margin, advice, save
        self.start: float | None = None
        self.best: tuple[float, int] | None = None  # (accuracy, step)
        self.end: tuple[float, int] | None = None
        self.below = False  # the last observation was more than the margin below the start

    def resume(self, records: list[dict[str, Any]], monitor: str | None) -> None:
        """Pick up a resumed run: the start from metrics.jsonl (when the monitor set is the same), the best from
        best.safetensors (the best backbone this run folder has produced)."""
        start = next((r for r in records if r.get("kind") == "start"), None)
        if start is not None and start.get("monitor") == monitor:
            self.start = float(start["knn_top1"])
        seen = [r for r in records if r.get("kind") in ("start", "epoch") and "knn_top1" in r]
        if seen:
            self.end = (float(seen[-1]["knn_top1"]), int(seen[-1]["step"]))
        meta = _metadata(self.best_path)
        if "knn_top1" in meta and "step" in meta:
            self.best = (float(json.loads(meta["knn_top1"])), int(json.loads(meta["step"])))

    def observe(self, step: int, accuracy: float, monitor: str | None = None) -> list[str]:
        """Record the monitored accuracy at ``step`` (0 = the start); write best.safetensors on a new best;
        return the warnings (one line each) to show."""
        if step == 0:
            self.start = accuracy
        self.end = (accuracy, step)
        if self.best is None or accuracy > self.best[0]:
            self.best = (accuracy, step)
            self.save(self.best_path, {"step": step, "knn_top1": accuracy, "monitor": monitor})
        if self.start is None or accuracy >= self.start - self.margin:
            self.below = False
            return []
        first, self.below = not self.below, True
        return [self._warning(accuracy)] if first else []

    def _warning(self, accuracy: float) -> str:
        assert self.start is not None and self.best is not None
        return (
            f"the monitored k-NN top-1 {accuracy:.3f} is {self.start - accuracy:.3f} below the start "
            f"{self.start:.3f} (adapt.warn_margin {self.margin:g}): training is moving the backbone away from what it "
            f"started from; {self.advice()}. {self.best_path.name} keeps the best backbone so far "
            f"({self.best[0]:.3f} at step {self.best[1]})"
        )

    def final_warnings(self) -> list[str]:
        """The warning again at the end of a run that ended below the start."""
        return [self._warning(self.end[0])] if self.below and self.end is not None else []

    def summary(self) -> str:
        """``k-NN top-1 start 0.712 → best 0.745 (step 400, best.safetensors) → end 0.731``, or ''."""
        if self.end is None:
            return ""
        start = "?" if self.start is None else f"{self.start:.3f}"
        best = "" if self.best is None else f" → best {self.best[0]:.3f} (step {self.best[1]}, {self.best_path.name})"
        return f"k-NN top-1 start {start}{best} → end {self.end[0]:.3f}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "best": None if self.best is None else {"knn_top1": self.best[0], "step": self.best[1]},
            "end": None if self.end is None else {"knn_top1": self.end[0], "step": self.end[1]},
            "best_backbone": str(self.best_path) if self.best is not None else None,
        }


def _metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return {}
