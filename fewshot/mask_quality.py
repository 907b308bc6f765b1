"""Mask quality: how well attention masks match ground-truth object masks (Jaccard / IoU).

DINO (Caron et al. 2021, Table 4 / Fig. 4) scores the masks that keep 60% of a head's attention mass by their
Jaccard similarity with ground-truth segmentations. Ground-truth masks are binary image files named like the
images; they are resized with nearest neighbours to the resolution the model ran at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fewshot.attention import AttentionMaps, upsample
from fewshot.errors import FewshotError


def jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two bool masks; two empty masks agree perfectly (1.0)."""
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask file -> bool (H, W): resized with nearest neighbours, foreground above half its max."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            grey = np.asarray(img.convert("L").resize((size[1], size[0]), Image.Resampling.NEAREST), np.float32)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise FewshotError(f"cannot read mask '{path}' ({exc}); masks are binary image files") from None
    return grey > grey.max() / 2 if grey.max() > 0 else np.zeros(size, dtype=bool)


def mask_index(folder: Path) -> dict[str, Path]:
    """Mask files under ``folder`` keyed by relative path without suffix, and by bare stem when unique."""
    from fewshot.images import is_image_name

    folder = Path(folder)
    if not folder.is_dir():
        raise FewshotError(f"mask folder '{folder}' does not exist; pass a folder of masks named like the images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p.name))
    index = {str(p.relative_to(folder).with_suffix("")): p for p in files}
    stems: dict[str, list[Path]] = {}
    for p in files:
        stems.setdefault(p.stem, []).append(p)
    index.update({s: ps[0] for s, ps in stems.items() if len(ps) == 1 and s not in index})
    return index


def mask_for(name: str, index: dict[str, Path]) -> Path | None:
    rel = str(Path(name).with_suffix(""))
    return index.get(rel) or index.get(Path(name).stem)


def jaccard_report(
    images: list[tuple[str, AttentionMaps]], index: dict[str, Path], size: tuple[int, int], patch: tuple[int, int]
) -> dict[str, Any]:
    """Jaccard of every head's mask, the mean map's mask and the union with the ground truth, per image and mean,
    for ``(image name, maps)`` pairs; masks are found in ``index`` (:func:`mask_index`) by the image's name."""
    per_image: dict[str, dict[str, Any]] = {}
    missing = []
    for name, maps in images:
        path = mask_for(name, index)
        if path is None:
            missing.append(name)
            continue
        truth = read_mask(path, size)  # (H, W)
        per_image[name] = {
            "mask": str(path),
            "heads": [jaccard(upsample(m, patch), truth) for m in maps.masks],
            "mean_map": jaccard(upsample(maps.mean_mask, patch), truth),
            "union": jaccard(upsample(maps.union_mask, patch), truth),
        }
    if not per_image:
        raise FewshotError(f"no mask matches an image name (e.g. '{images[0][0]}'); name masks like the images")
    per_head = np.mean([v["heads"] for v in per_image.values()], axis=0)
    report = {
        "images_with_masks": len(per_image),
        "missing_masks": missing,
        "threshold_note": "masks keep the fewest patches holding the threshold of the attention mass (DINO)",
        "mean_per_head": [float(v) for v in per_head],
        "best_head": int(per_head.argmax()),
        "best_head_jaccard": float(per_head.max()),
        "mean_map": float(np.mean([v["mean_map"] for v in per_image.values()])),
        "union": float(np.mean([v["union"] for v in per_image.values()])),
        "per_image": per_image,
    }
    return report
