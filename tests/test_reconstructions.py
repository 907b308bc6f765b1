"""Reconstruction grids: layout, what each panel shows, fixed images and masks, and the loop writing them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewshot.image_store import ImageStore, fit_tensor
from fewshot.methods.base import RunPlan
from fewshot.methods.mae import MAE
from fewshot.pretrain_config import MaeConfig, PretrainConfig
from fewshot.reconstructions import GAP, fixed_images, grid_size, write_reconstructions

CFG = PretrainConfig(
    method="mae", model="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, epochs=2, batch_size=4,
    log_every=1, mae=MaeConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4, reconstruct_every=1),
)  # fmt: skip


def _images(n: int = 10, side: int = 40) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _store(n: int = 10, side: int = 40) -> ImageStore:
    return ImageStore(*fit_tensor(_images(n, side), side))


def _mae() -> MAE:
    torch.manual_seed(0)
    return MAE.build(CFG, RunPlan(n_images=10, batch_size=4, steps_per_epoch=2, total_steps=4))


def test_grid_has_three_panels_per_image_with_the_right_content(tmp_path: Path) -> None:
    method, store = _mae(), _store()
    path = write_reconstructions(method, store, tmp_path / "r" / "grid.png", n=3, seed=0)
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert (grid.shape[1], grid.shape[0]) == grid_size(3, 32) == (3 * 32 + 2 * GAP, 3 * 32 + 2 * GAP)
    originals = fixed_images(store, 3, 32).permute(0, 2, 3, 1).numpy()
    step = 32 + GAP
    for row in range(3):
        orig, masked, recon = (grid[row * step : row * step + 32, c * step : c * step + 32] for c in range(3))
        assert np.array_equal(orig, originals[row])
        hidden = (masked == 128).all(-1)  # mid-grey patches
        assert 0.6 < hidden.mean() < 0.9  # 12 of 16 patches masked (an original pixel may be grey by chance)
        assert np.array_equal(recon[~hidden], orig[~hidden])  # visible patches shown as they are
        assert not np.array_equal(recon[hidden], orig[hidden])  # masked ones are predictions


def test_grids_use_the_same_images_and_masks_and_leave_training_state_alone(tmp_path: Path) -> None:
    method, store = _mae(), _store()
    method.train()
    rng = torch.get_rng_state()
    a = write_reconstructions(method, store, tmp_path / "a.png", n=2, seed=5)
    b = write_reconstructions(method, store, tmp_path / "b.png", n=2, seed=5)
    assert a.read_bytes() == b.read_bytes()
    assert method.training and torch.equal(torch.get_rng_state(), rng)
    assert fixed_images(store, 4, 32).shape == (4, 3, 32, 32)
    assert fixed_images(_store(2), 4, 32).shape == (2, 3, 32, 32)  # fewer images than rows


def test_fixed_images_are_the_centre_squares_of_the_images_not_their_canvases() -> None:
    wide = torch.zeros(1, 3, 20, 40, dtype=torch.uint8)
    wide[..., 10:30] = 200  # the centre square is bright, the sides dark
    store = ImageStore(*fit_tensor(wide, 40))  # a 20 x 40 image at the top of a 40 x 40 canvas of zeros
    assert store.sizes.tolist() == [[20, 40]]
    assert fixed_images(store, 1, 20).float().mean() == 200


def test_training_loop_writes_a_grid_per_epoch_and_at_the_end(tmp_path: Path) -> None:
    from dataclasses import replace

    from fewshot.train import pretrain

    pretrain(_images(8), tmp_path / "run", CFG, progress=False)
    pngs = sorted(p.name for p in (tmp_path / "run" / "reconstructions").iterdir())
    assert pngs == ["epoch_0001.png", "epoch_0002.png"]
    assert Image.open(tmp_path / "run" / "reconstructions" / "epoch_0002.png").size == grid_size(8, 32)
    only_end = replace(CFG, epochs=3, mae=replace(CFG.mae, reconstruct_every=0, reconstruct_images=2))
    pretrain(_images(8), tmp_path / "end", only_end, progress=False)
    assert [p.name for p in (tmp_path / "end" / "reconstructions").iterdir()] == ["epoch_0003.png"]
