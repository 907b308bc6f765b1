"""The decoded image store behind pretraining: every image decoded once into a ``(N, 3, S, S)`` uint8 tensor
(shorter side resized to S, centre square), kept in memory (on the GPU when it fits), and augmented a whole batch
at a time with tensor ops -- per-image PIL transforms in loader workers would compete for the same CPU cores.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fewshot.errors import FewshotError


def check_memory(n: int, side: int) -> None:
    """Refuse early (before minutes of decoding) when the decoded images cannot fit in memory."""
    import os

    need = n * 3 * side * side
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > 0.6 * ram:
        raise FewshotError(
            f"{n} images at {side}×{side} px need {need / 2**30:.1f} GiB in memory, more than this machine can spare "
            f"({ram / 2**30:.0f} GiB); lower pretrain.store_size / --img-size or pretrain on a subset"
        )


def place(store: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On CUDA keep the uint8 images on the GPU when they take under a quarter of its memory, else pin them."""
    if device.type != "cuda":
        return store
    if store.nbytes < 0.25 * torch.cuda.get_device_properties(device).total_memory:
        return store.to(device)
    return store.pin_memory()


def decode_images(images: Any, size: int, progress: bool = False) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """Decode every image once into ``(N, 3, size, size)`` uint8: shorter side resized to ``size`` (bicubic,
    antialiased), centre square cropped. Unreadable images are skipped and listed."""
    if torch.is_tensor(images):
        return _resize_tensor(images, size), []
    from fewshot.images import UnreadableImage

    n = len(images)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    kept, skipped = 0, []
    loader = images.load if hasattr(images, "load") else None
    for i in tqdm(range(n), desc="decoding", unit="img", disable=not progress or n < 500, file=sys.stderr):
        try:
            img = loader(i) if loader else _load_item(images[i])
        except (UnreadableImage, OSError) as exc:
            skipped.append({"path": _name(images, i), "reason": str(exc)})
            continue
        out[kept] = torch.from_numpy(np.array(_square(img.convert("RGB"), size))).permute(2, 0, 1)  # (3, S, S)
        kept += 1
    if kept == 0:
        raise FewshotError(f"none of the {n} images could be read; check the data source")
    return out[:kept].contiguous(), skipped


def _name(images: Any, i: int) -> str:
    records = getattr(images, "records", images)  # an ImageSet's records, or the sequence itself
    return str(getattr(records[i], "name", i))


def _load_item(item: Any) -> Image.Image:
    return item if isinstance(item, Image.Image) else item.load()


def _square(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _resize_tensor(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise FewshotError(f"image tensors must be (N, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images.contiguous()
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = torch.nn.functional.interpolate(images.float(), (nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8).contiguous()
