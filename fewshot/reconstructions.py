"""Reconstruction grids for masked-image models (MAE, He et al. 2022, Figure 2): one row per image, three panels
``original | masked | reconstruction``, written as a PNG into the run folder so a user can see what the model
has learnt while it trains.

The images are fixed for the whole run (evenly spaced through the decoded store, the centre square of each
resized to the model's input size) and so are their masks (a generator seeded with the run's seed), so grids of
successive epochs compare the same patches.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from fewshot.outputs import write_atomically

if TYPE_CHECKING:
    from fewshot.image_store import ImageStore
    from fewshot.methods.mae import MAE

GAP = 2  # white pixels between panels and rows


def fixed_images(store: ImageStore, n: int, size: int) -> Tensor:
    """``n`` images evenly spaced through ``store`` (a :class:`fewshot.image_store.ImageStore`): the centre square
    of each image in its canvas, resized to ``size``; ``(n, 3, size, size)`` uint8."""
    idx = torch.linspace(0, len(store) - 1, min(n, len(store))).round().long()
    pixels, sizes = store.gather(idx)  # (n, 3, S, S), (n, 2)
    out = []
    for image, (h, w) in zip(pixels, sizes.tolist(), strict=True):  # a few images
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = image[:, top : top + s, left : left + s].float()[None]  # (1, 3, s, s)
        if s != size:
            x = F.interpolate(x, (size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x)
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def grid_size(n: int, side: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid of ``n`` rows of three ``side``-pixel panels."""
    return 3 * side + 2 * GAP, n * side + (n - 1) * GAP


def grid_image(original: Tensor, masked: Tensor, recon: Tensor) -> Image.Image:
    """A white-spaced grid from three ``(n, 3, S, S)`` float tensors in 0..1, one row per image."""
    n, _, side, _ = original.shape
    width, height = grid_size(n, side)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for col, panel in enumerate((original, masked, recon)):
        pixels = (panel.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for row in range(n):
            top, left = row * (side + GAP), col * (side + GAP)
            canvas[top : top + side, left : left + side] = pixels[row]
    return Image.fromarray(canvas)


def write_reconstructions(model: MAE, store: ImageStore, path: Path, n: int = 8, seed: int = 0) -> Path:
    """Write the ``original | masked | reconstruction`` grid of ``n`` fixed images of ``store`` to ``path``.

    ``model``: an ``nn.Module`` with ``img_size`` and ``reconstruct(images (n, 3, S, S) uint8, generator)``
    returning three ``(n, 3, S, S)`` floats in 0..1 (:meth:`fewshot.methods.mae.MAE.reconstruct`).
    """
    device = next(model.parameters()).device
    images = fixed_images(store, n, model.img_size).to(device)  # (n, 3, S, S) uint8
    generator = torch.Generator(device=device).manual_seed(seed)  # the same masks every epoch
    panels = model.reconstruct(images, generator)
    grid = grid_image(*panels)
    return write_atomically(path, lambda tmp: grid.save(tmp, format="PNG"))  # never a half-written PNG
