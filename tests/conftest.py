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


def write_hub_repo(home: Path, repo: str, model_args: dict, pretrained_cfg: dict, seed: int = 3) -> dict:
    """A timm model laid out as a Hugging Face hub repository in the local cache under ``home`` (``HF_HOME``), so
    ``hf-hub:REPO`` loads with ``HF_HUB_OFFLINE=1``; returns its state dict. The architecture is ViT-tiny."""
    import json

    import timm
    import torch
    from safetensors.torch import save_file

    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(seed)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, **model_args)
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "model_args": model_args}
    (snapshot / "config.json").write_text(json.dumps({**config, "pretrained_cfg": pretrained_cfg}))
    return source.state_dict()
