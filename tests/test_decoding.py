"""Decoding for pretraining: whole images with their aspect ratio in canvases, written into their slots of a file by
worker processes (the same bytes as one process), JPEG draft mode, unreadable files skipped and listed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.decoding import decode_to_file, fit
from fewshot.images import load_rgb
from fewshot.sources import open_source


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("wh,expected", [((60, 30), (16, 8)), ((30, 90), (10, 30)), ((8, 6), (16, 12))])
def test_fit_makes_the_longer_side_the_stored_resolution_and_keeps_the_aspect(wh, expected) -> None:
    side = max(expected)
    out = fit(_photo(*wh), side)
    assert out.shape == (expected[1], expected[0], 3) and out.dtype == np.uint8


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i in range(150):  # enough for 2 workers (64 images per chunk)
        w, h = (40 + i % 30, 30 + (i * 7) % 40)
        _photo(w, h, seed=i).save(root / f"p{i:03d}.png")
    (root / "p050.png").write_bytes(_photo(40, 30).tobytes()[:100])  # raw bytes, not an image format
    (root / "p120.png").write_bytes((root / "p121.png").read_bytes()[:200])  # truncated
    return root


def _decode(folder: Path, path: Path, workers: int, side: int = 32) -> tuple[bytes, np.ndarray, list]:
    images = open_source(folder)
    path.write_bytes(bytes(len(images) * 3 * side * side))
    sizes, skipped = decode_to_file(images, range(len(images)), path, side, True, workers)
    return path.read_bytes(), sizes, skipped


def test_two_worker_processes_write_the_same_file_as_one_and_list_the_same_skips(folder: Path, tmp_path: Path):
    one, sizes1, skipped1 = _decode(folder, tmp_path / "one.u8", 1)
    two, sizes2, skipped2 = _decode(folder, tmp_path / "two.u8", 2)
    assert one == two
    assert np.array_equal(sizes1, sizes2) and len(sizes1) == 148
    assert skipped1 == skipped2
    assert [s["path"] for s in skipped1] == ["p050.png", "p120.png"]
    assert [s["reason"].split(" (")[0] for s in skipped1] == ["not an image", "corrupt or truncated image"]
    # slot 3 holds image 3 at the top-left of its canvas, zeros around it
    pixels = np.frombuffer(one, dtype=np.uint8).reshape(150, 3, 32, 32)
    i, h, w = sizes1[3]
    assert i == 3 and max(h, w) == 32
    expected = fit(load_rgb(folder / "p003.png"), 32).transpose(2, 0, 1)
    assert np.array_equal(pixels[3, :, :h, :w], expected)
    assert not pixels[3, :, h:].any() and not pixels[3, :, :, w:].any()


def test_a_shard_writes_only_its_own_slots(folder: Path, tmp_path: Path) -> None:
    images = open_source(folder)
    path = tmp_path / "shard.u8"
    path.write_bytes(bytes(len(images) * 3 * 16 * 16))
    sizes, _ = decode_to_file(images, range(1, len(images), 2), path, 16)  # rank 1 of 2
    pixels = np.frombuffer(path.read_bytes(), dtype=np.uint8).reshape(-1, 3, 16, 16)
    assert sizes[:, 0].tolist() == list(range(1, 150, 2))  # the broken files (50, 120) are in the other shard
    assert not pixels[0::2].any() and pixels[1::2].any()


def test_jpeg_draft_mode_decodes_large_photos_smaller_and_nearly_the_same(tmp_path: Path) -> None:
    _photo(1024, 768).save(tmp_path / "big.jpg", quality=95)
    full, draft = load_rgb(tmp_path / "big.jpg"), load_rgb(tmp_path / "big.jpg", draft=200)
    assert full.size == (1024, 768) and draft.size == (256, 192)  # 1/4 scale: still ≥ 200 px on the longer side
    difference = np.abs(fit(full, 200).astype(int) - fit(draft, 200).astype(int))
    assert difference.mean() < 2.0  # levels of 255
    assert load_rgb(tmp_path / "big.jpg", draft=2000).size == (1024, 768)  # never enlarged
    _photo(1024, 768).save(tmp_path / "big.png")
    assert load_rgb(tmp_path / "big.png", draft=200).size == (1024, 768)  # JPEG only


def test_workers_that_cannot_start_fall_back_to_this_process_with_a_warning(folder: Path, tmp_path: Path, monkeypatch,
                                                                            caplog) -> None:  # fmt: skip
    from concurrent.futures.process import BrokenProcessPool

    import fewshot.decoding as decoding

    def broken(*args: object, **kwargs: object) -> None:
        raise BrokenProcessPool("a worker died while starting")

    one, sizes1, _ = _decode(folder, tmp_path / "one.u8", 1)
    monkeypatch.setattr(decoding, "_in_workers", broken)
    fallback, sizes2, _ = _decode(folder, tmp_path / "two.u8", 2)
    assert fallback == one and np.array_equal(sizes1, sizes2)
    assert any("decoding in this process" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
