"""The bad-input corpus: real-world messes, each a counted and listed skip or a one-line error, never a traceback.

Every file is built at run time. Commands run through the CLI, as a user meets them.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fewshot.cli import app
from tests.conftest import TINY_VIT

runner = CliRunner()


def run(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def one_line_error(code: int, out: str, *needles: str) -> None:
    lines = [line for line in out.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, out
    for needle in needles:
        assert needle in lines[0], lines[0]


def photo(size: tuple[int, int] = (24, 24), seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming a decompression-bomb size, with almost no data."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo((30, 10)), "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 0, 250))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def multipage_tiff() -> bytes:
    return encode(photo(), "TIFF", save_all=True, append_images=[photo(seed=1)])


JPEG = encode(photo(), "JPEG")
PNG = encode(photo(), "PNG")
# name -> (bytes, expected: "ok" or a fragment of the skip reason)
FILES: dict[str, tuple[bytes, str]] = {
    "truncated.jpg": (JPEG[: len(JPEG) // 2], "truncated"),
    "truncated.png": (PNG[: len(PNG) // 2], "truncated"),
    "zero.jpg": (b"", "empty file"),
    "text.png": (b"just some words", "not an image"),
    "page.jpg": (b"<!DOCTYPE html><html><body>Not found</body></html>", "not an image"),
    "bomb.png": (huge_png(), "too large"),
    "cmyk.jpg": (encode(photo().convert("CMYK"), "JPEG"), "ok"),
    "deep16.png": (encode(Image.fromarray(np.full((9, 9), 40000, np.uint16)), "PNG"), "ok"),
    "palette.png": (encode(photo().convert("P"), "PNG", transparency=3), "ok"),
    "la.png": (encode(Image.new("LA", (5, 5), (90, 128)), "PNG"), "ok"),
    "rgba.png": (encode(Image.new("RGBA", (5, 5), (9, 9, 9, 10)), "PNG"), "ok"),
    "tiny.png": (encode(Image.new("RGB", (1, 1)), "PNG"), "ok"),
    "rotated.jpg": (exif_rotated(), "ok"),
    "animated.gif": (animated_gif(), "ok"),
    "pages.tif": (multipage_tiff(), "ok"),
    "notes.txt": (b"a readme", "not an image file"),
    ".hidden.jpg": (JPEG, "hidden"),
    ".DS_Store": (b"\0\0\0\1Bud1", "hidden"),
}


@pytest.fixture()
def messy(tmp_path: Path) -> Path:
    root = tmp_path / "messy"
    root.mkdir()
    for name, (data, _) in FILES.items():
        (root / name).write_bytes(data)
    (root / "broken.jpg").symlink_to(root / "missing.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    os.symlink(root, root / "subdir-loop")  # a folder symlink back to the root is not followed
    (root / os.fsdecode(b"caf\xe9-latin1.png")).write_bytes(PNG)  # a non-UTF-8 file name
    locked = root / "locked.png"
    locked.write_bytes(PNG)
    locked.chmod(0)
    return root


def test_messy_folder_extracts_good_images_and_lists_the_rest(messy: Path, tmp_path: Path) -> None:
    from fewshot.features import load_features

    code, out = run("extract", messy, "-b", "pixels:8", "-o", tmp_path / "f.safetensors", "-q")
    assert code == 0, out
    feats = load_features(tmp_path / "f.safetensors")
    reasons = {s["path"]: s["reason"] for s in feats.skipped}
    for name, (_, expected) in FILES.items():
        if expected == "ok":
            assert name in feats.paths, name
        else:
            assert expected in reasons[name], (name, reasons.get(name))
    assert reasons["broken.jpg"] == "broken symlink" and "loop.jpg" in reasons
    assert os.fsdecode(b"caf\xe9-latin1.png") in feats.paths
    if os.geteuid() == 0:  # root reads any file; elsewhere a locked file is a listed skip
        assert "locked.png" in feats.paths
    else:
        assert reasons["locked.png"] == "permission denied"
    assert f"skipped {len(feats.skipped)} file(s)" in out
    assert f"{len(feats.paths)} images" in out
    # The orientation was applied before resizing and the first frame of the animation was used.
    gif = feats.features[feats.paths.index("animated.gif")].reshape(3, 8, 8)
    assert gif[0].mean() > 0.9 and gif[2].mean() < 0.1


def labelled(root: Path, counts: dict[str, int], offset: int = 0) -> Path:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            photo(seed=offset + i + 100 * len(cls)).save(root / cls / f"{i}.png")
    return root


def _copied(t: Path, into: str) -> list[object]:
    """evaluate TRAIN TEST where one TEST image was copied, under another name, into TRAIN or the pool."""
    train, test = labelled(t / "tr", {"a": 3, "b": 3}), labelled(t / "te", {"a": 2, "b": 2}, offset=50)
    pool = t / "pool"
    pool.mkdir()
    photo(seed=999).save(pool / "u_0000.png")
    (train / "a" / "copy.png" if into == "train" else pool / "u_0001.png").write_bytes(
        (test / "b" / "1.png").read_bytes()
    )
    return ["evaluate", train, test, "-b", "pixels:4", "--shots", "1", "--seeds", "1", "--heads", "spread",
            "--unlabeled", pool, "-o", t / "ev"]  # fmt: skip


CASES: dict[str, tuple[Callable[[Path], list[object]], tuple[str, ...]]] = {
    "empty folder": (lambda t: ["extract", (t / "e").mkdir() or t / "e", "-o", t / "f"], ("no readable images",)),
    "only broken files": (
        lambda t: ["extract", _write(t / "b" / "x.jpg", b"junk").parent, "-o", t / "f"],
        ("no readable images",),
    ),
    "missing data": (lambda t: ["extract", t / "nowhere", "-o", t / "f"], ("does not exist",)),
    "fewer images than shots": (
        lambda t: ["probe", labelled(t / "d", {"a": 5, "b": 2}), "-b", "pixels:4", "--shots", "3", "-o", t / "h"],
        ("class 'b' has 2 labelled image(s)", "lower --shots"),
    ),
    "unlabelled train": (
        lambda t: ["probe", _write(t / "u" / "x.png", PNG).parent, "-b", "pixels:4", "-o", t / "h"],
        ("has no labels",),
    ),
    "test classes differ": (
        lambda t: [
            "evaluate",
            labelled(t / "tr", {"a": 3, "b": 3}),
            labelled(t / "te", {"a": 2, "zebra": 2}, offset=50),
            "-b",
            "pixels:4",
            "--shots",
            "1",
            "--seeds",
            "1",
            "-o",
            t / "ev",
        ],
        ("not in TRAIN: zebra",),
    ),
    "csv without path column": (
        lambda t: ["extract", _write(t / "m.csv", b"file,label\nx.png,1\n"), "-o", t / "f"],
        ("no 'path' column",),
    ),
    "missing run folder": (
        lambda t: ["extract", labelled(t / "d", {"a": 1}), "-b", t / "runs" / "nope", "-o", t / "f"],
        ("not a file, a run folder or a timm model",),
    ),
    "run folder without weights": (
        lambda t: ["extract", labelled(t / "d", {"a": 1}), "-b", (t / "run").mkdir() or t / "run", "-o", t / "f"],
        ("no backbone.safetensors",),
    ),
    "weights of the wrong architecture": (
        lambda t: ["extract", labelled(t / "d", {"a": 1}), "-b", _tiny_weights(t) + ",embed_dim=96", "-o", t / "f"],
        ("do not fit this architecture",),
    ),
    "pickle that runs code": (
        lambda t: ["extract", labelled(t / "d", {"a": 1}), "-b", _evil(t) + ":arch=vit_tiny_patch16_224", "-o", t],
        ("refusing to load",),
    ),
    "unknown head": (
        lambda t: ["probe", labelled(t / "d", {"a": 2, "b": 2}), "-b", "pixels:4", "--head", "svm", "-o", t / "h"],
        ("unknown head 'svm'",),
    ),
    "unknown head suffix": (
        lambda t: ["evaluate", *_pair(t), "-b", "pixels:4", "--heads", "knn+whiten", "-o", t / "ev"],
        ("unknown head 'knn+whiten'", "+center"),
    ),
    "TEST image copied into TRAIN": (lambda t: _copied(t, "train"), ("also in TRAIN", "b/1.png = a/copy.png")),
    "TEST image copied into the pool": (
        lambda t: _copied(t, "pool"),
        ("also in the unlabeled pool", "b/1.png = u_0001.png", "--allow-overlap"),
    ),
    "unknown selection strategy": (
        lambda t: ["evaluate", *_pair(t), "-b", "pixels:4", "--select", "random,best", "-o", t / "ev"],
        ("evaluate.select", "typiclust"),
    ),
    "reference is not a backbone": (
        lambda t: ["evaluate", *_pair(t), "-b", "pixels:4", "--reference", "pixels:8", "-o", t / "ev"],
        ("--reference 'pixels:8' is not one of the backbones",),
    ),
    "select budget beyond the images": (
        lambda t: ["select", labelled(t / "d", {"a": 3}), "-b", "pixels:4", "--budget", "5", "-o", t / "s"],
        ("only 3 are not yet labelled", "lower --budget"),
    ),
    "select without a budget": (
        lambda t: ["select", labelled(t / "d", {"a": 3}), "-b", "pixels:4", "-o", t / "s"],
        ("--budget must be a positive number",),
    ),
    "probcover without a class count": (
        lambda t: ["select", labelled(t / "d", {"a": 3}), "--strategy", "probcover", "-n", "2", "-o", t / "s"],
        ("--classes N",),
    ),
    "spread with no neighbours": (
        lambda t: [
            "evaluate",
            *_pair(t),
            "-b",
            "pixels:4",
            "--heads",
            "spread",
            "-s",
            "heads.spread.k=0",
            "-o",
            t / "e",
        ],
        ("heads.spread needs k >= 1",),
    ),
    "selftrain threshold above 1": (
        lambda t: [
            "evaluate",
            *_pair(t),
            "-b",
            "pixels:4",
            "--heads",
            "selftrain",
            "-s",
            "heads.selftrain.threshold=2",
            "-o",
            t / "e",
        ],
        ("heads.selftrain needs", "0 <= threshold < 1"),
    ),
    "select excluding a missing folder": (
        lambda t: ["select", labelled(t / "d", {"a": 3}), "-n", "1", "--exclude", t / "nope", "-o", t / "s"],
        ("--exclude", "does not exist"),
    ),
}


def _pair(t: Path) -> list[Path]:
    return [labelled(t / "tr", {"a": 3, "b": 3}), labelled(t / "te", {"a": 2, "b": 2}, offset=50)]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tiny_weights(t: Path) -> str:
    from fewshot.backbones import load_backbone

    torch.save(load_backbone(TINY_VIT).model.state_dict(), t / "w.pth")
    return f"{t / 'w.pth'}:arch=vit_tiny_patch16_224,img_size=32,patch_size=8,depth=2"


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def _evil(t: Path) -> str:
    import pickle

    with open(t / "evil.pth", "wb") as fh:
        pickle.dump({"state_dict": _Exploit()}, fh, protocol=2)
    return str(t / "evil.pth")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_error(case: str, tmp_path: Path) -> None:
    build, needles = CASES[case]
    code, out = run(*build(tmp_path), "-q")
    one_line_error(code, out, *needles)
