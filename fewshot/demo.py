"""``fewshot demo``: the main job end to end on real images that ship inside scikit-learn (no download).

scikit-learn bundles the UCI optical digits (Alpaydin & Kaynak 1998): 1,797 real 8x8 scans of handwritten
digits with 17 grey levels. The demo writes them as PNG ImageFolders (stratified train/test halves, seed 0),
then evaluates raw pixels against a randomly initialised ViT over 1-10 shots with confidence intervals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fewshot.config import Config, EvaluateConfig

DEMO_BACKBONES = ("pixels:8", "vit_tiny_patch16_224:img_size=32,patch_size=8")


def write_digits(root: Path, test_fraction: float = 0.5, seed: int = 0) -> tuple[Path, Path]:
    """Materialise scikit-learn's digits as ``root/train/<digit>/*.png`` and ``root/test/<digit>/*.png``."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), grey levels 0..16 -> 0..255
    index = np.arange(len(images))
    train_idx, test_idx = train_test_split(index, test_size=test_fraction, stratify=digits.target, random_state=seed)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        for i in idx:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            file = folder / f"digit_{i:04d}.png"
            if not file.exists():
                Image.fromarray(images[i], mode="L").save(file)
    return root / "train", root / "test"


def run_demo(out: Path, cfg: Config | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the digits and evaluate the demo backbones on them; returns the evaluation report."""
    from fewshot.evaluation import evaluate

    cfg = cfg or Config(evaluate=EvaluateConfig(backbones=DEMO_BACKBONES))
    train, test = write_digits(Path(out) / "data")
    return evaluate(train, test, cfg=cfg, out=Path(out) / "evaluation", progress=progress)
