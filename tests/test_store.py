"""The decoded image store: every image decoded once to a uint8 square, unreadable ones skipped and listed."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fewshot.errors import FewshotError
from fewshot.store import decode_images


def test_decode_accepts_pil_images_and_loaders_and_skips_unreadable() -> None:
    from fewshot.images import UnreadableImage

    class Rec:
        def __init__(self, img: Image.Image | None) -> None:
            self.img, self.name = img, "broken.jpg"

        def load(self) -> Image.Image:
            if self.img is None:
                raise UnreadableImage("corrupt")
            return self.img

    wide = Image.new("RGB", (60, 30), (255, 0, 0))
    grey = Image.new("L", (20, 40), 128)
    out, skipped = decode_images([Rec(wide), Rec(None), Rec(grey)], 16)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.uint8
    assert out[0, 0].min() == 255 and out[1].float().mean() == pytest.approx(128, abs=1)
    assert skipped == [{"path": "broken.jpg", "reason": "corrupt"}]
    assert decode_images([wide, grey], 16)[0].shape == (2, 3, 16, 16)


def test_uint8_tensors_are_resized_to_a_centre_square_and_other_tensors_refused() -> None:
    images = torch.zeros(2, 3, 20, 40, dtype=torch.uint8)
    images[..., 10:30] = 200  # a bright centre band: the centre square keeps it all
    out, skipped = decode_images(images, 10)
    assert out.shape == (2, 3, 10, 10) and skipped == []
    assert out.float().mean() > 190  # the dark sides were cropped away (bicubic rings a little at the edge)
    with pytest.raises(FewshotError, match="uint8"):
        decode_images(torch.zeros(2, 3, 8, 8), 8)


def test_nothing_readable_is_a_one_line_error() -> None:
    from fewshot.images import UnreadableImage

    class Broken:
        name = "x.jpg"

        def load(self) -> Image.Image:
            raise UnreadableImage("truncated")

    with pytest.raises(FewshotError, match="none of the 2 images"):
        decode_images([Broken(), Broken()], 8)
