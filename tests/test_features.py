"""Feature extraction: the file format, pooling, the cache, and bad images listed instead of crashing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import fewshot.features as features_module
from fewshot.config import ExtractConfig
from fewshot.errors import FewshotError
from fewshot.features import extract, extract_features, load_features
from tests.conftest import TINY_VIT


def messy_folder(root: Path) -> Path:
    """Good images in unusual modes next to files that cannot be decoded."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    photo.save(root / "good.jpg")
    photo.convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16)).save(root / "deep16.png")
    pal = photo.convert("P")
    pal.save(root / "palette.png", transparency=0)
    data = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "text.png").write_text("this is not a picture")
    (root / "zero.png").write_bytes(b"")
    return root


def test_bad_files_are_skipped_and_listed(tmp_path: Path) -> None:
    feats = extract_features(messy_folder(tmp_path / "messy"), ExtractConfig(backbone="pixels:8"), progress=False)
    assert sorted(feats.paths) == ["cmyk.jpg", "deep16.png", "good.jpg", "palette.png"]
    reasons = {s["path"]: s["reason"] for s in feats.skipped}
    assert set(reasons) == {"truncated.jpg", "text.png", "zero.png"}
    assert "truncated" in reasons["truncated.jpg"] and "not an image" in reasons["text.png"]
    assert feats.features.shape == (4, 3 * 8 * 8)


def test_nothing_readable_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_text("nope")
    with pytest.raises(FewshotError, match="no readable images"):
        extract_features(tmp_path / "bad", ExtractConfig(backbone="pixels"), progress=False)


def test_file_format_is_the_documented_contract(digits: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "train.safetensors"
    feats = extract(digits[0], backbone=TINY_VIT, out=out, pool="cls", progress=False)
    with safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
        x, y = f.get_tensor("features"), f.get_tensor("labels")
    assert x.dtype == np.float32 and x.shape == (40, 192) and y.dtype == np.int64
    assert json.loads(meta["classes"]) == ["0", "1", "2", "3"]
    assert json.loads(meta["paths"])[0] == "0/d0000.png" and json.loads(meta["skipped"]) == []
    assert meta["backbone"] == TINY_VIT and meta["pool"] == "cls" and meta["weights_sha256"].startswith("random-init:")
    assert json.loads(meta["transform"])["input_size"] == [3, 32, 32]
    np.testing.assert_array_equal(load_features(out).features, feats.features)
    assert json.loads((tmp_path / "train.config.json").read_text())["config"]["extract"]["backbone"] == TINY_VIT


@pytest.mark.parametrize(("pool", "dim"), [("cls", 192), ("avg", 192), ("cls+avg", 384), ("last2", 384)])
def test_pooling_dimensions(digits: tuple[Path, Path], pool: str, dim: int) -> None:
    feats = extract_features(digits[1], ExtractConfig(backbone=TINY_VIT, pool=pool), progress=False)
    assert feats.features.shape == (24, dim) and np.isfinite(feats.features).all()


def test_pools_agree_with_the_tokens(digits: tuple[Path, Path]) -> None:
    cls = extract_features(digits[1], ExtractConfig(backbone=TINY_VIT, pool="cls"), progress=False).features
    both = extract_features(digits[1], ExtractConfig(backbone=TINY_VIT, pool="cls+avg"), progress=False).features
    last1 = extract_features(digits[1], ExtractConfig(backbone=TINY_VIT, pool="last1"), progress=False).features
    np.testing.assert_allclose(both[:, :192], cls, atol=1e-5)
    np.testing.assert_allclose(last1, cls, atol=1e-4)  # the last block's class token, normed, is forward_features'


@pytest.mark.parametrize("pool", ["max", "last0", "last9"])
def test_bad_pool(digits: tuple[Path, Path], pool: str) -> None:
    with pytest.raises(FewshotError, match="pool"):
        extract_features(digits[1], ExtractConfig(backbone=TINY_VIT, pool=pool), progress=False)


def test_cache_serves_the_same_request(digits: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ExtractConfig(backbone=TINY_VIT)
    first = extract_features(digits[1], cfg, progress=False)

    def boom(*args: object) -> None:
        raise AssertionError("recomputed instead of served from the cache")

    monkeypatch.setattr(features_module, "_compute", boom)
    np.testing.assert_array_equal(extract_features(digits[1], cfg, progress=False).features, first.features)
    with pytest.raises(AssertionError, match="recomputed"):  # another pool is another cache entry
        extract_features(digits[1], ExtractConfig(backbone=TINY_VIT, pool="avg"), progress=False)
    with pytest.raises(AssertionError, match="recomputed"):  # and so is the cache switched off
        extract_features(digits[1], ExtractConfig(backbone=TINY_VIT, cache=False), progress=False)


def test_batches_do_not_change_features(digits: tuple[Path, Path]) -> None:
    a = extract_features(digits[1], ExtractConfig(backbone=TINY_VIT, batch_size=5, cache=False), progress=False)
    b = extract_features(digits[1], ExtractConfig(backbone=TINY_VIT, batch_size=64, cache=False), progress=False)
    np.testing.assert_allclose(a.features, b.features, atol=1e-5)
    assert a.paths == b.paths


def test_a_spec_can_carry_its_own_pool(digits: tuple[Path, Path]) -> None:
    """`-b runs/mae:pool=avg` beside `-b runs/dino` in one evaluation: the spec's pool wins over --pool."""
    own = extract_features(digits[1], ExtractConfig(backbone=TINY_VIT + ",pool=cls+avg", pool="cls"), progress=False)
    plain = extract_features(digits[1], ExtractConfig(backbone=TINY_VIT, pool="cls+avg"), progress=False)
    assert own.meta["pool"] == "cls+avg" and own.features.shape == (24, 384)
    np.testing.assert_allclose(own.features, plain.features, atol=1e-6)
