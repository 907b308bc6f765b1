"""Every PIL mode becomes RGB; undecodable files raise UnreadableImage with a reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.images import UnreadableImage, load_rgb


def saved(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_grey_and_palette_become_rgb() -> None:
    grey = load_rgb(saved(Image.new("L", (5, 4), 77), "PNG"))
    assert grey.mode == "RGB" and grey.size == (5, 4) and grey.getpixel((0, 0)) == (77, 77, 77)
    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_rgb(saved(pal, "PNG")).getpixel((1, 1)) == (10, 200, 30)


def test_transparency_is_composited_over_white() -> None:
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert load_rgb(saved(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (2, 2), (0, 255))
    assert load_rgb(saved(la, "PNG")).getpixel((0, 0)) == (0, 0, 0)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([9, 9, 9] * 256)
    assert load_rgb(saved(pal, "PNG", transparency=0)).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped() -> None:
    arr = np.array([[0, 65535], [32896, 1000]], dtype=np.uint16)
    img = load_rgb(saved(Image.fromarray(arr), "PNG"))
    got = np.asarray(img)[..., 0]
    assert got[0, 0] == 0 and got[0, 1] == 255 and got[1, 0] == 128


def test_cmyk_jpeg() -> None:
    img = load_rgb(saved(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"))
    r, g, b = img.getpixel((1, 1))
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_exif_orientation_is_respected() -> None:
    img = Image.new("RGB", (6, 2), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    assert load_rgb(saved(img, "JPEG", exif=exif)).size == (2, 6)


def test_first_frame_of_animation() -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in ((250, 0, 0), (0, 0, 250))]
    data = saved(frames[0], "GIF", save_all=True, append_images=frames[1:])
    r, _, b = load_rgb(data).getpixel((0, 0))
    assert r > 200 and b < 50


def test_one_pixel_image() -> None:
    assert load_rgb(saved(Image.new("RGB", (1, 1)), "PNG")).size == (1, 1)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not an image"),
        (b"hello, I am text", "not an image"),
        (b"<html><body>404</body></html>", "not an image"),
    ],
)
def test_non_images(payload: bytes, reason: str) -> None:
    with pytest.raises(UnreadableImage, match=reason):
        load_rgb(payload)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files(fmt: str) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = saved(noise, fmt)
    with pytest.raises(UnreadableImage, match="truncated"):
        load_rgb(data[: len(data) // 2])


def test_decompression_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UnreadableImage, match="too large"):
        load_rgb(saved(Image.new("L", (20, 20)), "PNG"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImage, match="not found"):
        load_rgb(tmp_path / "gone.png")
