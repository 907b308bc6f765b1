"""A small seeded set of images with ground-truth object masks, for checking attention masks' Jaccard.

Each image is a textured background (multi-scale value noise, randomly tinted, plus grain) with one object
pasted on it: a real handwritten-digit silhouette (scikit-learn's bundled digits, upscaled and thresholded)
filled with a crop of a real photo (scikit-learn's bundled sample photos, or the images of ``--objects DIR``,
e.g. /work/shared/data/clothing10/unlabeled). Nothing is downloaded. Writes ``OUT/images/NNN.png`` and
``OUT/masks/NNN.png`` (0/255, same file names).

Run: ``python benchmarks/masked_set.py OUT [--n 24] [--size 224] [--seed 0] [--objects DIR]``, then e.g.
``fewshot attention OUT/images --backbone runs/dino --masks OUT/masks --out OUT/attention``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8 background: smooth noise at a few scales, tinted, with fine grain."""
    field = np.zeros((size, size, 3), dtype=np.float32)
    for cells, weight in ((3, 0.5), (7, 0.3), (17, 0.2)):
        coarse = rng.random((cells, cells, 3)).astype(np.float32)
        img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        field += weight * np.asarray(img, dtype=np.float32) / 255.0
    tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    field = field * tint + 0.15 * rng.standard_normal((size, size, 3)).astype(np.float32)
    return (np.clip(field, 0, 1) * 255).astype(np.uint8)


def _fills(objects: Path | None) -> list[Image.Image]:
    """Photos whose crops fill the silhouettes."""
    if objects is not None:
        files = sorted(p for p in Path(objects).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise SystemExit(f"no .jpg/.png images under {objects}")
        return [Image.open(p).convert("RGB") for p in files[:200]]
    from sklearn.datasets import load_sample_image

    return [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]


def write_masked_set(root: Path, n: int = 24, size: int = 224, seed: int = 0, objects: Path | None = None) -> Path:
    """Write ``root/images`` and ``root/masks`` (``n`` images of ``size`` x ``size``, seeded); return ``root``."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits().images  # (1797, 8, 8), values 0..16
    fills = _fills(objects)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        side = int(rng.uniform(0.4, 0.65) * size)
        digit = Image.fromarray((digits[rng.integers(len(digits))] * (255 / 16)).astype(np.uint8))
        shape = np.asarray(digit.resize((side, side), Image.Resampling.BICUBIC)) > 90  # (side, side) silhouette
        fill = fills[rng.integers(len(fills))]
        scale = max(side / min(fill.size), 1.0)
        fill = fill.resize((int(fill.width * scale) + 1, int(fill.height * scale) + 1))
        fx, fy = int(rng.integers(0, fill.width - side + 1)), int(rng.integers(0, fill.height - side + 1))
        patch = np.asarray(fill.crop((fx, fy, fx + side, fy + side)))  # (side, side, 3)
        x, y = rng.integers(0, size - side + 1, size=2)
        img = _texture(rng, size)
        mask = np.zeros((size, size), dtype=bool)
        mask[y : y + side, x : x + side] = shape
        img[y : y + side, x : x + side][shape] = patch[shape]
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{i:03d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objects", type=Path, default=None, help="folder of photos to fill the objects with")
    args = parser.parse_args()
    write_masked_set(args.out, args.n, args.size, args.seed, args.objects)
    print(f"{args.n} images and masks written to {args.out}/images and {args.out}/masks")


if __name__ == "__main__":
    main()
