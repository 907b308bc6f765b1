"""The online k-NN monitor: DINO's weighted vote with the image itself left out, accuracy that tracks how
separable the features are, one-line errors for bad sources, and the backbone's modes left as they were."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from fewshot.errors import FewshotError
from fewshot.monitor import KnnMonitor, knn_vote
from fewshot.pretrain_config import IMAGENET_MEAN, IMAGENET_STD

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 230, 40)]


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2)


def write_classes(root: Path, images: dict[str, list[np.ndarray]]) -> Path:
    for name, arrays in images.items():
        (root / name).mkdir(parents=True)
        for i, a in enumerate(arrays):
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


def solid(colour: tuple[int, int, int], rng: np.random.Generator, noise: int = 12) -> np.ndarray:
    """A 40×40 image of one colour with a little per-pixel noise, so no two images are identical."""
    base = np.full((40, 40, 3), colour, dtype=np.int16)
    return np.clip(base + rng.integers(-noise, noise + 1, base.shape), 0, 255).astype(np.uint8)


def colour_folder(root: Path, per_class: int, seed: int) -> Path:
    """An ImageFolder of 4 classes, one colour each: trivially separable."""
    rng = np.random.default_rng(seed)
    return write_classes(root, {str(c): [solid(col, rng) for _ in range(per_class)] for c, col in enumerate(COLOURS)})


def monitor(source: Path, k: int = 5) -> KnnMonitor:
    return KnnMonitor.from_source(str(source), 32, IMAGENET_MEAN, IMAGENET_STD, k=k, progress=False)


# ---------------------------------------------------------------------------------------------- the vote


def test_vote_leaves_the_image_itself_out() -> None:
    # k=1: x0's nearest *other* point is x1 (label 1), x1's is x0 (label 0), x2's is x1 (cos 0.0995 > 0 for x0).
    # Had each image counted itself, every prediction would be its own label.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])  # (3, 2)
    y = torch.tensor([0, 1, 1])
    assert knn_vote(x, y, k=1).tolist() == [1, 0, 1]


def test_vote_weighs_neighbours_by_exp_similarity_over_temperature() -> None:
    # Row 0's 3 neighbours: one of class 1 at cosine 1.0, two of class 0 at cosine 0.9. Class 1 wins iff
    # exp(1/T) > 2 exp(0.9/T), i.e. T < 0.1 / ln 2 ≈ 0.144: DINO's T=0.07 trusts the closest, T=1 counts heads.
    s = math.sqrt(1 - 0.9**2)
    x = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0.9, s, 0], [0.9, 0, s]])  # (4, 3)
    y = torch.tensor([2, 1, 0, 0])
    assert knn_vote(x, y, k=3, temperature=0.07)[0] == 1
    assert knn_vote(x, y, k=3, temperature=1.0)[0] == 0


def test_vote_in_chunks_matches_one_pass() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=gen), torch.randint(0, 3, (50,), generator=gen)
    assert torch.equal(knn_vote(x, y, k=7, chunk=4), knn_vote(x, y, k=7, chunk=1000))


# ---------------------------------------------------------------------------------------------- the monitor


def test_separable_classes_score_high(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "colours", per_class=6, seed=0)
    mon = monitor(root)
    assert len(mon) == 24 and mon.note == ""
    assert mon(tiny_vit(), torch.device("cpu"))["knn_top1"] >= 0.9


def test_identical_images_score_at_chance_or_below(tmp_path: Path) -> None:
    same = solid((128, 128, 128), np.random.default_rng(0))
    root = write_classes(tmp_path / "same", {str(c): [same] * 6 for c in range(4)})
    assert monitor(root)(tiny_vit(), torch.device("cpu"))["knn_top1"] <= 0.5


def test_images_are_decoded_once(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "c", per_class=3, seed=1)
    mon, vit = monitor(root), tiny_vit()
    first = mon(vit, torch.device("cpu"))
    shutil.rmtree(root)  # later calls never read the files again
    assert mon(vit, torch.device("cpu")) == first


@pytest.mark.parametrize("training", [True, False])
def test_backbone_runs_in_eval_without_grad_and_its_mode_is_restored(tmp_path: Path, training: bool) -> None:
    root = colour_folder(tmp_path / "c", per_class=3, seed=2)
    vit = tiny_vit().train(training)
    blocks: Any = vit.blocks  # a timm ViT's nn.Sequential of blocks
    blocks[0].train(not training)  # a mixed state must come back module by module
    before = {name: m.training for name, m in vit.named_modules()}
    seen: list[tuple[bool, bool]] = []
    blocks[1].register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    monitor(root)(vit, torch.device("cpu"))
    assert seen and all(s == (False, False) for s in seen)
    assert {name: m.training for name, m in vit.named_modules()} == before


# ---------------------------------------------------------------------------------------------- bad sources


def test_missing_source_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FewshotError, match=r"--monitor .*does not exist"):
        monitor(tmp_path / "nowhere")


def test_unlabelled_source_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    for i in range(3):
        Image.fromarray(solid(COLOURS[i], np.random.default_rng(i))).save(tmp_path / "flat" / f"{i}.png")
    with pytest.raises(FewshotError, match="has no labels"):
        monitor(tmp_path / "flat")


def test_one_class_is_one_line(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    root = write_classes(tmp_path / "one", {"only": [solid(COLOURS[0], rng) for _ in range(4)]})
    with pytest.raises(FewshotError, match="at least 2 classes"):
        monitor(root)


def test_small_set_lowers_k_and_unreadable_images_are_noted(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    root = write_classes(tmp_path / "small", {"a": [solid(COLOURS[0], rng)] * 2, "b": [solid(COLOURS[1], rng)] * 2})
    (root / "a" / "broken.png").write_bytes(b"not a png")
    mon = monitor(root, k=20)
    assert len(mon) == 4 and mon.k == 3
    assert "k lowered from 20 to 3" in mon.note and "skipped 1 unreadable" in mon.note
    assert 0.0 <= mon(tiny_vit(), torch.device("cpu"))["knn_top1"] <= 1.0
