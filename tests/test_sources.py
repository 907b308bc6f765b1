"""Data sources: folders, ImageFolders, CSV manifests and Hugging Face datasets as records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from fewshot.errors import FewshotError
from fewshot.sources import UNLABELED, natural_sorted, open_source


def img(path: Path, color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_plain_folder_is_recursive_and_unlabelled(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    img(tmp_path / "sub" / "deeper" / "b.jpg")
    images = open_source(tmp_path)
    assert [r.name for r in images.records] == ["a.png", "sub/deeper/b.jpg"]
    assert not images.labeled and all(r.label == UNLABELED for r in images.records)
    assert images.load(1).mode == "RGB"


def test_imagefolder_labels_and_natural_class_order(tmp_path: Path) -> None:
    for cls in ("10", "2", "1"):
        img(tmp_path / cls / "x.png")
    images = open_source(tmp_path)
    assert images.classes == ["1", "2", "10"]  # labels that are numbers keep numeric order
    assert [(r.name, r.label) for r in images.records] == [("1/x.png", 0), ("2/x.png", 1), ("10/x.png", 2)]


def test_skips_are_counted_and_listed(tmp_path: Path) -> None:
    img(tmp_path / "cat" / "ok.png")
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    (tmp_path / "cat" / "notes.txt").write_text("hi")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "cat" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "dog").mkdir()  # a class with no images is dropped and listed
    images = open_source(tmp_path)
    assert images.classes == ["cat"] and len(images) == 1
    reasons = {s["path"]: s["reason"] for s in images.skipped}
    assert reasons["cat/empty.png"].startswith("empty file")
    assert reasons["cat/notes.txt"].startswith("not an image file")
    assert reasons["cat/.DS_Store"].startswith("hidden")
    assert reasons["cat/broken.png"] == "broken symlink"
    assert "no images" in reasons["dog/"]


def test_symlink_loop_does_not_hang(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    os.symlink(tmp_path, tmp_path / "loop")  # a folder symlink pointing at its parent
    (tmp_path / "self.png").symlink_to(tmp_path / "self.png")
    images = open_source(tmp_path)
    assert [r.name for r in images.records] == ["a.png"]
    assert any(s["path"] == "self.png" for s in images.skipped)


def test_csv_manifest_paths_relative_to_csv(tmp_path: Path) -> None:
    img(tmp_path / "imgs" / "a.png")
    img(tmp_path / "imgs" / "b.png")
    (tmp_path / "m.csv").write_text(
        "path,label,extra\nimgs/a.png,3,x\nimgs/b.png,12,y\nimgs/gone.png,3,z\nimgs/a.png,,\n"
    )
    images = open_source(tmp_path / "m.csv")
    assert images.classes == ["3", "12"]
    assert [(r.name, r.label) for r in images.records] == [("imgs/a.png", 0), ("imgs/b.png", 1)]
    assert images.skipped == [
        {"path": "imgs/gone.png", "reason": "file not found"},
        {"path": "imgs/a.png", "reason": "listed again on line 5 (first on line 2; ignored)"},
    ]


def test_csv_duplicates_count_once_even_when_spelled_differently(tmp_path: Path) -> None:
    for name in ("a", "b"):
        img(tmp_path / "imgs" / f"{name}.png")
    rows = "imgs/a.png,hat\nimgs/b.png,cap\n" * 2 + "imgs/../imgs/a.png,hat\n"
    (tmp_path / "m.csv").write_text("path,label\n" + rows)
    images = open_source(tmp_path / "m.csv")
    assert [r.name for r in images.records] == ["imgs/a.png", "imgs/b.png"]  # 2 shots, not 5
    assert len(images.skipped) == 3 and all("listed again" in s["reason"] for s in images.skipped)


def test_csv_blank_labels_in_a_labelled_manifest_are_an_error_naming_the_lines(tmp_path: Path) -> None:
    for name in "abcd":
        img(tmp_path / f"{name}.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,hat\nb.png,\nc.png,cap\nd.png, \n")
    with pytest.raises(FewshotError, match=r"leaves 2 blank \(line\(s\) 3, 5\)"):
        open_source(tmp_path / "m.csv")
    (tmp_path / "u.csv").write_text("path,label\na.png,\nb.png,\n")  # no label anywhere: an unlabelled manifest
    assert not open_source(tmp_path / "u.csv").labeled


def test_relabelled_manifest_changes_the_fingerprint(tmp_path: Path) -> None:
    for name in "ab":
        img(tmp_path / f"{name}.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,hat\nb.png,shoe\n")
    (tmp_path / "r.csv").write_text("path,label\na.png,headwear\nb.png,shoe\n")  # same order of classes
    before, after = open_source(tmp_path / "m.csv"), open_source(tmp_path / "r.csv")
    assert [r.label for r in before.records] == [r.label for r in after.records]
    assert before.fingerprint != after.fingerprint


def test_stray_images_beside_class_folders_are_named_when_labels_are_needed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for cls in ("cat", "dog"):
        img(tmp_path / "mixed" / cls / "1.png")
    img(tmp_path / "mixed" / "stray.png")
    assert not open_source(tmp_path / "mixed").labeled  # a folder with top-level images is an unlabelled folder
    assert "stray.png" in caplog.text and "folder:" in caplog.text  # ... with a warning where labels may be meant
    caplog.clear()
    assert not open_source(f"folder:{tmp_path / 'mixed'}").labeled and not caplog.text  # said so: no warning
    with pytest.raises(FewshotError, match=r"class subfolders \(cat, dog\) but also 1 image\(s\) beside them \(stray"):
        open_source(tmp_path / "mixed", require_labels=True)
    assert open_source(f"imagefolder:{tmp_path / 'mixed'}").classes == ["cat", "dog"]


def test_csv_without_path_column(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(FewshotError, match="no 'path' column"):
        open_source(tmp_path / "m.csv")


def test_explicit_prefix_overrides_detection(tmp_path: Path) -> None:
    img(tmp_path / "cls" / "a.png")
    assert not open_source(f"folder:{tmp_path}").labeled
    assert open_source(f"imagefolder:{tmp_path}").classes == ["cls"]


def test_missing_empty_and_unlabelled_sources(tmp_path: Path) -> None:
    with pytest.raises(FewshotError, match="does not exist"):
        open_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FewshotError, match="no readable images"):
        open_source(tmp_path / "empty")
    img(tmp_path / "flat" / "a.png")
    with pytest.raises(FewshotError, match="has no labels"):
        open_source(tmp_path / "flat", require_labels=True)


def test_fingerprint_follows_content(tmp_path: Path) -> None:
    img(tmp_path / "c" / "a.png")
    before = open_source(tmp_path).fingerprint
    assert open_source(tmp_path).fingerprint == before
    img(tmp_path / "c" / "b.png")
    assert open_source(tmp_path).fingerprint != before


def test_hugging_face_save_to_disk_with_splits(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"image": [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)], "label": [0, 1, 0, 1]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["no", "yes"])})
    ds = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "hf"))
    train = open_source(tmp_path / "hf")
    assert train.classes == ["no", "yes"] and [r.label for r in train.records] == [0, 1, 0, 1]
    assert train.load(2).getpixel((0, 0)) == (80, 0, 0)
    assert len(open_source(f"{tmp_path / 'hf'}:test")) == 2
    with pytest.raises(FewshotError, match="splits"):
        open_source(f"{tmp_path / 'hf'}:validation")


def test_hugging_face_imagefolder_with_metadata(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    root = tmp_path / "hfimg"
    img(root / "a.png")
    img(root / "b.png", (200, 0, 0))
    (root / "metadata.csv").write_text("file_name,label\na.png,cat\nb.png,dog\n")
    images = open_source(root)
    assert images.classes == ["cat", "dog"] and sorted(r.label for r in images.records) == [0, 1]


def test_natural_sorted() -> None:
    assert natural_sorted(["cls10", "cls2", "Cls1", "b"]) == ["b", "Cls1", "cls2", "cls10"]
