"""Shared fixtures: tiny real-image folders built at run time, an isolated feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# A ViT shrunk through timm kwargs so every test runs in seconds on 2 CPU cores.
TINY_VIT = "vit_tiny_patch16_224:img_size=32,patch_size=8,depth=2"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own feature cache, so a hit is always one this test made."""
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path_factory.mktemp("cache")))


def write_digits_folder(root: Path, classes: int = 4, per_class: int = 10, offset: int = 0) -> Path:
    """An ImageFolder of real scikit-learn digits (8x8 scans, upscaled to 16x16 PNG)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(classes):
        rows = np.flatnonzero(digits.target == c)[offset : offset + per_class]
        folder = root / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        for i in rows:
            pixels = np.rint(digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((16, 16), Image.NEAREST).save(folder / f"d{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, test) ImageFolders: 4 digit classes, 10 train and 6 test images each, disjoint."""
    base = tmp_path_factory.mktemp("digits")
    train = write_digits_folder(base / "train", per_class=10)
    test = write_digits_folder(base / "test", per_class=6, offset=10)
    return train, test
