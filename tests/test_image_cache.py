"""The decoded-image cache on disk: built once and reused without decoding, a new entry when a file changes (the old
one deleted), unreadable images skipped and listed, unfinished entries rebuilt, a clear error when the disk is
too small, and a folder of one's choice."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.decoding import fit
from fewshot.errors import FewshotError
from fewshot.image_cache import cache_folder, entry_name, open_cache
from fewshot.images import load_rgb
from fewshot.sources import open_source


def _folder(root: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (48, 36) if i % 2 else (30, 50)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def test_the_second_open_reuses_the_file_without_decoding(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data")
    images = open_source(data)
    first = open_cache(images, 24)
    assert first.built and first.path.parent == cache_folder() and first.pixels.shape == (12, 3, 24, 24)
    assert first.sizes.tolist() == [[24, 14] if i % 2 == 0 else [18, 24] for i in range(12)]  # (h, w)
    expected = fit(load_rgb(data / "img01.png"), 24).transpose(2, 0, 1)
    assert np.array_equal(first.pixels[1, :, :18, :].numpy(), expected)
    shutil.rmtree(data)  # nothing left to decode: a hit must not need the images
    second = open_cache(images, 24)
    assert not second.built and second.path == first.path
    assert torch.equal(second.pixels, first.pixels) and torch.equal(second.sizes, first.sizes)
    names = {entry_name(images, 24, True), entry_name(images, 24, False), entry_name(images, 32, True)}
    assert len(names) == 3 and first.path.stem in names  # other settings, other entries


def test_a_changed_file_gives_a_new_entry_and_the_stale_one_is_deleted(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data")
    old = open_cache(open_source(data), 24)
    Image.new("RGB", (40, 40), (255, 255, 255)).save(data / "img03.png")
    os.utime(data / "img03.png", ns=(1, 1))  # a different mtime even within one clock tick
    new = open_cache(open_source(data), 24)
    assert new.built and new.path != old.path and not old.path.exists()
    assert sorted(p.name.split(".")[0] for p in cache_folder().iterdir()) == [new.path.stem] * 3  # .u8 .index .lock
    assert new.pixels[3, :, :24, :24].min() == 255 and not torch.equal(new.pixels[3], old.pixels[3])


def test_unreadable_images_are_skipped_listed_and_leave_no_hole(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data")
    (data / "img02.png").write_text("not an image")
    (data / "img05.png").write_bytes((data / "img04.png").read_bytes()[:100])
    images = open_source(data)
    cached = open_cache(images, 24)
    assert [s["path"] for s in cached.skipped] == ["img02.png", "img05.png"]
    assert cached.pixels.shape[0] == 10 and cached.path.stat().st_size == 10 * 3 * 24 * 24
    # the last readable images fill the holes: every canvas is a real image, each exactly once
    originals = {i: fit(load_rgb(data / f"img{i:02d}.png"), 24) for i in range(12) if i not in (2, 5)}
    found = []
    for canvas, (h, w) in zip(cached.pixels.numpy(), cached.sizes.tolist(), strict=True):
        image = canvas[:, :h, :w].transpose(1, 2, 0)  # (h, w, 3)
        found += [i for i, img in originals.items() if img.shape == image.shape and np.array_equal(img, image)]
    assert sorted(found) == sorted(originals)
    assert open_cache(images, 24).skipped == cached.skipped  # listed again on a hit


def test_an_unfinished_entry_is_rebuilt(tmp_path: Path) -> None:
    images = open_source(_folder(tmp_path / "data"))
    cached = open_cache(images, 24)
    cached.path.with_suffix(".index.safetensors").unlink()  # as if killed before the index was written
    again = open_cache(images, 24)
    assert again.built and torch.equal(again.pixels, cached.pixels)
    with open(again.path, "r+b") as f:  # a truncated pixel file does not match its index
        f.truncate(100)
    assert open_cache(images, 24).built


def test_too_little_free_space_is_a_one_line_error_naming_the_fixes(tmp_path: Path, monkeypatch) -> None:
    images = open_source(_folder(tmp_path / "data"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    with pytest.raises(FewshotError, match=r"needs 0\.0 GiB for 12 images at 24 px .* pretrain\.data\.cache_dir"):
        open_cache(images, 24)
    assert not list(cache_folder().glob("*.u8*"))


def test_the_folder_can_be_moved(tmp_path: Path) -> None:
    images = open_source(_folder(tmp_path / "data"))
    cached = open_cache(images, 24, folder=tmp_path / "fast-disk")
    assert cached.path.parent == tmp_path / "fast-disk"
    assert cache_folder(str(tmp_path / "x")) == tmp_path / "x"
    assert cache_folder() == Path(os.environ["FEWSHOT_CACHE"]) / "images"
