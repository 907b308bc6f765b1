"""Decoding images from the wild into RGB, or into a one-line reason why not.

Every PIL mode becomes 8-bit RGB: L/P/CMYK/YCbCr convert directly, transparency (RGBA, LA, PA, palette with a
transparent index) is composited over white, 16/32-bit integer and float greyscale are rescaled rather than
clipped. EXIF orientation is applied, multi-frame files (GIF, TIFF) give their first frame. Anything that cannot
be decoded raises :class:`UnreadableImage` with a reason the caller lists as a skip.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)

# Truncated files must fail loudly so they are listed, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class UnreadableImage(Exception):
    """The file is not a decodable image; ``str(exc)`` is the reason shown to the user."""


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def load_rgb(source: str | Path | bytes | BinaryIO, draft: int | None = None) -> Image.Image:
    """Open ``source`` (a path, bytes or a binary file object) and return an RGB image, fully decoded.

    ``draft``: a JPEG whose longer side exceeds it is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
    Pillow's draft mode) where the result still has a longer side of at least ``draft`` px: several times faster
    for photos that are resized down anyway. Other formats ignore it."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than fails) between 1x and 2x MAX_IMAGE_PIXELS; treat both as too large.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                opened.seek(0)
                if draft and opened.format == "JPEG" and max(opened.size) > draft:
                    scale = draft / max(opened.size)  # draft keeps both sides ≥ the requested ones
                    opened.draft(None, (math.ceil(opened.width * scale), math.ceil(opened.height * scale)))
                opened.load()
                return to_rgb(ImageOps.exif_transpose(opened))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage(
            f"too large to decode safely (more than {Image.MAX_IMAGE_PIXELS:,} pixels); downscale it"
        ) from None
    except UnidentifiedImageError:
        raise UnreadableImage("not an image (unrecognised format)") from None
    except FileNotFoundError:
        raise UnreadableImage("file not found (moved, deleted or a broken symlink)") from None
    except PermissionError:
        raise UnreadableImage("permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        # Pillow signals truncated or corrupt data through several exception types.
        reason = str(exc).strip() or type(exc).__name__
        raise UnreadableImage(f"corrupt or truncated image ({reason})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in _WIDE_GREY_MODES:
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        elif arr.size and arr.max() > 255:
            arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        return grey.convert("RGB")
    if img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
