"""Leakage guard: a TEST image found in TRAIN or the pool by content, whatever its name; hashes cached."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fewshot.errors import FewshotError
from fewshot.leakage import check_overlap, content_hashes, overlap
from fewshot.sources import open_source
from tests.conftest import write_digits_folder


def test_a_copy_under_another_name_is_found(tmp_path: Path) -> None:
    train = write_digits_folder(tmp_path / "train", classes=3, per_class=4)
    test = write_digits_folder(tmp_path / "test", classes=3, per_class=3, offset=4)
    assert overlap(open_source(train), open_source(test)) == []
    victim = sorted((test / "2").glob("*.png"))[0]
    shutil.copy(victim, train / "0" / "renamed.png")  # another class folder, another name
    pairs = overlap(open_source(train), open_source(test))
    assert pairs == [("0/renamed.png", f"2/{victim.name}")]
    with pytest.raises(FewshotError, match=rf"1 TEST image\(s\) are also in TRAIN .*2/{victim.name} = 0/renamed.png"):
        check_overlap(open_source(test), {"TRAIN": open_source(train)}, allow=False)
    found = check_overlap(open_source(test), {"TRAIN": open_source(train), "the unlabeled pool": None}, allow=True)
    assert found == [{"with": "TRAIN", "test": f"2/{victim.name}", "other": "0/renamed.png"}]


def test_hashes_are_cached_per_source_fingerprint(tmp_path: Path) -> None:
    folder = write_digits_folder(tmp_path / "d", classes=2, per_class=2)
    images = open_source(folder)
    first = content_hashes(images)
    assert len(first) == 4 and len(set(first)) == 4
    cached = list(Path(os.environ["FEWSHOT_CACHE"]).glob("hashes/*.json"))  # conftest isolates the cache
    assert len(cached) == 1
    victim = sorted((folder / "1").glob("*.png"))[0]
    victim.write_bytes((folder / "0" / sorted(p.name for p in (folder / "0").glob("*.png"))[0]).read_bytes())
    again = content_hashes(open_source(folder))  # size/mtime changed: a new fingerprint, hashed afresh
    assert again[2] == first[0] and again != first
